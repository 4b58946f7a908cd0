"""
The one interface every data source implements, the ways to combine sources, and the shared
loading code (local files first, then the Hugging Face hub).

A conversation is a dict:
    {"messages": [{"role": "system", "content": str},              # optional, first only
                  {"role": "user", "content": str},
                  {"role": "assistant", "content": str | [part, ...]}, ...],
     ...task metadata (e.g. "letters" for categorical tasks)}
with user/assistant alternating after the optional system message. An assistant part is
{"type": "text" | "python" | "python_output", "text": str}: python parts are tool calls (trained),
python_output parts are what the tool returned (not trained; the tokenizer masks them).

Local data (nanochat.common.resolve_data_path): `tasks_dir` argument > $NANOCHAT_TASKS_DIR >
$NANOCHAT_DATA_ROOT/tasks > <base dir>/tasks, laid out as gsm8k/, arc/, mmlu/, humaneval/ (see
shared/data/README.md). Chat jsonl files: $NANOCHAT_CHAT_DIR > $NANOCHAT_DATA_ROOT/chat > the tasks
dir's sibling chat/. Word list: $NANOCHAT_WORDS_FILE > $NANOCHAT_DATA_ROOT/words/words_alpha.txt >
the tasks dir's sibling words/words_alpha.txt. Where local data is missing, the `datasets` package
loads the standard hub dataset; where that is not possible either, a NanochatError names the task
and the local path.
"""

import bisect
import json
import os
import re

import numpy as np

from nanochat.common import NanochatError, get_base_dir, resolve_data_path


class Task:
    """
    A data source: a sequence of conversations, optionally with an evaluation.

    start, stop, step: a view over the underlying examples, like range(start, stop, step)
    (stop=None means the end). Subclasses implement num_examples() and get_example(index) over the
    underlying data; evaluable tasks also set eval_type and implement evaluate(). Conversations may
    be shared between calls: treat them as read-only.

    eval_type: "generative" (sample a completion, check it), "categorical" (score the answer letters
    in conversation["letters"] from the logits) or None (training data only).
    """

    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        for name, value in [("start", start), ("step", step)] + ([("stop", stop)] if stop is not None else []):
            if not isinstance(value, int) or value < 0:
                raise NanochatError(f"{type(self).__name__}: {name} must be an int >= 0, got {value!r}")
        if step == 0:
            raise NanochatError(f"{type(self).__name__}: step must be >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        """Number of underlying examples (before start/stop/step)."""
        raise NotImplementedError

    def get_example(self, index):
        """The conversation for underlying example `index` (0 <= index < num_examples())."""
        raise NotImplementedError

    def _indices(self):
        n = self.num_examples()
        return range(self.start, n if self.stop is None else min(self.stop, n), self.step)

    def __len__(self):
        return len(self._indices())

    def __getitem__(self, i):
        """Conversation i of the view; negative i counts from the end; IndexError past the end."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} indices must be integers, not {type(i).__name__}")
        return self.get_example(self._indices()[i])

    def evaluate(self, conversation, completion):
        """Whether `completion` (the model's assistant text) answers `conversation` correctly."""
        raise TypeError(f"{type(self).__name__} is training data only: it has no evaluation")

    def reward(self, conversation, completion):
        """RL reward in [0, 1] for `completion`; by default 1.0 when evaluate() says correct."""
        return float(self.evaluate(conversation, completion))

    def source_files(self):
        """
        The local files this task's examples come from (absolute paths, in reading order): data
        files it read, and for a generated task the generator's own module, since editing it changes
        the data. scripts/data.py hashes them to tell when a prepared data set is stale. Default:
        none (data from the Hugging Face hub has no local file to watch).
        """
        return list(getattr(self, "_source_files", []))


class TaskMixture(Task):
    """
    Several tasks interleaved in one deterministic shuffled order.

    tasks: list of Task.
    weights: optional list of positive floats; the mixture then has `size` examples (default: the
        sum of the tasks' lengths) split in proportion to the weights (largest-remainder rounding,
        so the counts sum to size exactly).
    counts: optional list of ints >= 0 or None (None = the task's length): how many examples each
        task contributes. Not together with weights.
    With neither, every example of every task appears once.
    A task contributing more examples than it has repeats them: successive passes, each in a fresh
    seeded permutation; fewer takes a seeded random subset. The final order is a seeded shuffle of
    everything, so the same tasks, counts and seed always give the same sequence.
    A mixture has no evaluation of its own: evaluate conversation i with task_of(i).
    """

    def __init__(self, tasks, weights=None, counts=None, size=None, seed=42, **view):
        super().__init__(**view)
        tasks = list(tasks)
        if not tasks:
            raise NanochatError("TaskMixture: no tasks given")
        if weights is not None and counts is not None:
            raise NanochatError("TaskMixture: give weights or counts, not both")
        if size is not None and weights is None:
            raise NanochatError("TaskMixture: size only applies together with weights")
        lengths = [len(t) for t in tasks]
        for task, n in zip(tasks, lengths):
            if n == 0:
                raise NanochatError(f"TaskMixture: task {type(task).__name__} is empty")
        if weights is not None:
            counts = split_by_weights(weights, sum(lengths) if size is None else size, len(tasks))
        elif counts is not None:
            if len(counts) != len(tasks):
                raise NanochatError(f"TaskMixture: {len(counts)} counts for {len(tasks)} tasks")
            for c in counts:
                if c is not None and (not isinstance(c, int) or c < 0):
                    raise NanochatError(f"TaskMixture: counts must be ints >= 0 or None, got {c!r}")
            counts = [n if c is None else c for c, n in zip(counts, lengths)]
        else:
            counts = lengths
        self.tasks, self.counts, self.seed = tasks, counts, seed
        rng = np.random.default_rng(seed)
        task_ids, example_ids = [], []
        for t, (count, n) in enumerate(zip(counts, lengths)):
            passes = -(-count // n)
            picks = np.concatenate([rng.permutation(n) for _ in range(passes)])[:count] if count else []
            task_ids.append(np.full(count, t, dtype=np.int32))
            example_ids.append(np.asarray(picks, dtype=np.int64))
        order = rng.permutation(sum(counts))
        self.task_ids = np.concatenate(task_ids)[order]
        self.example_ids = np.concatenate(example_ids)[order]

    def num_examples(self):
        return len(self.task_ids)

    def get_example(self, index):
        return self.tasks[self.task_ids[index]][int(self.example_ids[index])]

    def task_of(self, i):
        """The task that conversation i of this view comes from (e.g. to evaluate it)."""
        return self.tasks[self.task_ids[self._indices()[i]]]

    def source_files(self):
        return _union_of_sources(self.tasks)


class TaskSequence(Task):
    """Tasks one after another, in the given order (e.g. a curriculum)."""

    def __init__(self, tasks, **view):
        super().__init__(**view)
        self.tasks = list(tasks)
        if not self.tasks:
            raise NanochatError("TaskSequence: no tasks given")
        self.offsets = np.cumsum([0] + [len(t) for t in self.tasks]).tolist()

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        t = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[t][index - self.offsets[t]]

    def source_files(self):
        return _union_of_sources(self.tasks)


def _union_of_sources(tasks):
    return list(dict.fromkeys(path for task in tasks for path in task.source_files()))


def split_by_weights(weights, size, n_tasks):
    """`size` (int >= 0) split into n_tasks ints in proportion to `weights` (positive numbers), by
    largest remainder so that they sum to size exactly. Raises NanochatError on bad input."""
    if len(weights) != n_tasks:
        raise NanochatError(f"TaskMixture: {len(weights)} weights for {n_tasks} tasks")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise NanochatError(f"TaskMixture: weights must be positive numbers, got {w!r}")
    if not isinstance(size, int) or size < 0:
        raise NanochatError(f"TaskMixture: size must be an int >= 0, got {size!r}")
    total = float(sum(weights))
    exact = [size * w / total for w in weights]
    counts = [int(e) for e in exact]
    # Largest remainder: hand the leftover examples to the largest fractional parts (ties: lower index).
    for i in sorted(range(n_tasks), key=lambda i: (counts[i] - exact[i], i))[: size - sum(counts)]:
        counts[i] += 1
    return counts


# -----------------------------------------------------------------------------
# Conversations

def validate_conversation(obj, where):
    """
    Check `obj` against the conversation format in the module docstring and return
    {"messages": [...]}. A bare list is taken as the messages. Extra top-level keys are dropped.
    Raises NanochatError("<where>: <what is wrong>").
    """
    messages = obj if isinstance(obj, list) else obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list):
        raise NanochatError(f"{where}: expected an object with a 'messages' list")
    if not messages:
        raise NanochatError(f"{where}: 'messages' is empty")
    first_turn = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise NanochatError(f"{where}: message {i} must be an object with exactly 'role' and 'content'")
        role, content = message["role"], message["content"]
        expected = "system" if i < first_turn else ("user", "assistant")[(i - first_turn) % 2]
        if role != expected:
            raise NanochatError(f"{where}: message {i} has role {role!r}, expected {expected!r} "
                                "(optional system first, then user and assistant alternating)")
        if role == "assistant" and isinstance(content, list):
            for j, part in enumerate(content):
                if (not isinstance(part, dict) or set(part) != {"type", "text"} or not isinstance(part["text"], str)
                        or part["type"] not in ("text", "python", "python_output")):
                    raise NanochatError(f"{where}: message {i} part {j} must be "
                                        "{'type': 'text'|'python'|'python_output', 'text': str}")
        elif not isinstance(content, str):
            raise NanochatError(f"{where}: message {i} ({role}) content must be a string"
                                + (" or a list of parts" if role == "assistant" else ""))
    if messages[-1]["role"] != "assistant":
        raise NanochatError(f"{where}: the last message must be from the assistant")
    return {"messages": messages}


def assistant_text(message):
    """The plain text of an assistant message: its string, or its parts joined (all types)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def render_mc(question, choices, letters):
    """
    The multiple-choice prompt shared by MMLU and ARC: the question, one "X. choice" line per
    choice, and an instruction to answer with the letter alone, so that the first assistant token
    is the letter (categorical evaluation compares the logits of the letters there).
    """
    lines = [question.strip(), ""] + [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(letters)}) only."]
    return "\n".join(lines)


def extract_choice(completion, letters):
    """The letter a completion picks: a leading letter ("B", "B.", "(B) ..."), else the last
    standalone letter among `letters` after "answer"; None if it names none."""
    text = completion.strip()
    m = re.match(r"\(?([A-Z])\b", text)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.findall(r"answer(?: is)?:?\s*\(?([A-Z])\b", text, flags=re.IGNORECASE)
    if m and m[-1].upper() in letters:
        return m[-1].upper()
    return None


# -----------------------------------------------------------------------------
# Where data comes from

def resolve_tasks_dir(path=None):
    """Local task data root: `path` > $NANOCHAT_TASKS_DIR > $NANOCHAT_DATA_ROOT/tasks > <base dir>/tasks."""
    return os.path.abspath(resolve_data_path(path, "NANOCHAT_TASKS_DIR", "tasks",
                                             lambda: os.path.join(get_base_dir(), "tasks")))


def resolve_chat_dir(tasks_root=None):
    """Local chat jsonl directory: $NANOCHAT_CHAT_DIR > $NANOCHAT_DATA_ROOT/chat > the tasks dir's sibling chat/."""
    return os.path.abspath(resolve_data_path(None, "NANOCHAT_CHAT_DIR", "chat",
                                             lambda: os.path.join(resolve_tasks_dir(tasks_root), "..", "chat")))


def resolve_words_file(tasks_root=None):
    """Word list (one word per line): $NANOCHAT_WORDS_FILE > $NANOCHAT_DATA_ROOT/words/words_alpha.txt > the
    tasks dir's sibling words/words_alpha.txt."""
    subpath = os.path.join("words", "words_alpha.txt")
    return os.path.abspath(resolve_data_path(None, "NANOCHAT_WORDS_FILE", subpath,
                                             lambda: os.path.join(resolve_tasks_dir(tasks_root), "..", subpath)))


def read_jsonl(path):
    """Yield (line_number, object) for every non-blank line; NanochatError("path:line: ...") on bad JSON."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise NanochatError(f"{path}:{line_number}: invalid JSON ({e.msg} at column {e.colno})") from None


def load_hub(task, local_path, hub_path, hub_name, split):
    """
    Rows of a Hugging Face hub dataset (datasets.load_dataset(hub_path, hub_name, split=split)), for
    a task whose local data at `local_path` is missing. Returns an indexable sequence of dicts.
    Raises NanochatError naming the task and local_path when `datasets` is missing or the hub fails.
    """
    where = f"{task}: no local data at {local_path} (set --tasks-dir, NANOCHAT_TASKS_DIR or NANOCHAT_DATA_ROOT)"
    try:
        import datasets
    except ImportError:
        raise NanochatError(f"{where}, and the `datasets` package to fetch {hub_path} from the "
                            "Hugging Face hub is not installed") from None
    try:
        return datasets.load_dataset(hub_path, hub_name, split=split)
    except Exception as e:  # network, auth, missing split: all mean "not available", reported in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanochatError(f"{where}, and loading {hub_path} from the Hugging Face hub failed: {reason}") from None


def check_choice(task, name, value, allowed):
    if value not in allowed:
        raise NanochatError(f"{task}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
