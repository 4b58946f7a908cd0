"""
tasks/: parsing and answer checking on real items of the shared data, mixtures, recipes, and
the loading rules (local files, then the hub, else a one-line error naming the task and path).

The shared data is found at ../shared/data from the repository (helpers/scripts_util.py); the
data tests skip when it is absent. The hub is never contacted: the hub path is exercised with a
stand-in `datasets` module.
"""

import json
import os
import re
import sys
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.scripts_util import SHARED_DATA
from nanochat.common import NanochatError
from nanochat.execution import run_tool_call
from tasks.arc import ARC, arc_row_from_original
from tasks.common import Task, TaskMixture, TaskSequence, extract_choice, validate_conversation
from tasks.customjson import DEFAULT_IDENTITY_FILE, CustomJSON, Identity
from tasks.gsm8k import GSM8K, extract_answer, solution_steps, steps_bucket
from tasks.humaneval import HumanEval
from tasks.mmlu import GROUPS, MMLU, SUBJECT_GROUPS, read_mmlu_csv, subject_group
from tasks.multihop import MultiHop
from tasks.recipe import load_recipe
from tasks.smoltalk import TEST_EVERY, SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

SHARED = Path(SHARED_DATA)
REPO = Path(__file__).resolve().parents[1]
needs_shared = pytest.mark.skipif(not (SHARED / "tasks").is_dir(), reason=f"shared data not found at {SHARED}")


@pytest.fixture
def shared_env(monkeypatch):
    """Point the tasks at the shared data; chat dir and word list come from the default sibling rule."""
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(SHARED / "tasks"))
    monkeypatch.delenv("NANOCHAT_CHAT_DIR", raising=False)
    monkeypatch.delenv("NANOCHAT_WORDS_FILE", raising=False)


@pytest.fixture
def empty_env(monkeypatch, tmp_path):
    """No local data anywhere: tasks must fall back to the hub."""
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "tasks"))
    monkeypatch.delenv("NANOCHAT_CHAT_DIR", raising=False)
    monkeypatch.delenv("NANOCHAT_WORDS_FILE", raising=False)
    return tmp_path / "tasks"


def reply(conversation):
    return conversation["messages"][-1]["content"]


# -----------------------------------------------------------------------------
# GSM8K

@needs_shared
def test_gsm8k_calculator_annotations_become_tool_calls(shared_env):
    conversation = GSM8K(split="train")[0]
    assert conversation["messages"][0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert reply(conversation) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]


@needs_shared
def test_gsm8k_parts_reproduce_every_solution(shared_env):
    # Lossless: putting the annotations back gives the original solution text, for every row.
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(SHARED / "tasks" / "gsm8k" / f"{split}.jsonl")]
        task = GSM8K(split=split)
        assert len(task) == len(rows) == {"train": 7473, "test": 1319}[split]
        for row, conversation in zip(rows, task):
            text, parts = "", reply(conversation)
            for part in parts:
                if part["type"] == "text":
                    text += part["text"]
                elif part["type"] == "python":
                    text += f"<<{part['text']}="
                else:
                    text += f"{part['text']}>>"
            assert text == row["answer"]
            validate_conversation(conversation, "gsm8k")


@needs_shared
def test_gsm8k_tool_calls_agree_with_the_sandboxed_tool(shared_env):
    task = GSM8K(split="test")
    calls = [(a["text"], b["text"]) for i in (0, 1, 2, 3) for a, b in zip(reply(task[i]), reply(task[i])[1:])
             if a["type"] == "python"]
    assert len(calls) >= 8
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(run_tool_call, [expression for expression, _ in calls]))
    assert outputs == [expected for _, expected in calls]


@needs_shared
def test_gsm8k_answer_checking(shared_env):
    task = GSM8K(split="test")
    conversation = task[0]  # Janet's ducks: 18
    reference = "".join(part["text"] for part in reply(conversation))
    assert task.evaluate(conversation, reference)
    assert task.evaluate(conversation, "She makes 9 * 2 = 18 dollars.\n#### 18")
    assert task.evaluate(conversation, "#### 18.0")
    assert not task.evaluate(conversation, "#### 19")
    assert not task.evaluate(conversation, "The answer is 18")  # no #### marker
    assert not task.evaluate(conversation, "#### 17\n#### 19")  # the last marker counts
    assert task.reward(conversation, "#### 18") == 1.0 and task.reward(conversation, "#### 1") == 0.0
    assert extract_answer("#### 1,080") == "1080" and extract_answer("#### $5") == "5"


def test_gsm8k_steps_are_the_solution_lines_before_the_answer():
    two = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert solution_steps(two) == 2
    assert solution_steps("a\n\n  \nb\nc\n#### 3") == 3  # blank lines are not steps
    assert solution_steps("a\nb\nc\nd\n#### 4") == 4
    assert solution_steps("one line, no marker") == 1
    assert solution_steps("#### 5") == 0
    assert solution_steps("a = #### b\nc\n#### 6") == 2  # only the last marker ends the solution
    assert [steps_bucket(n) for n in range(1, 9)] == ["1-3"] * 3 + ["4-5"] * 2 + ["6+"] * 3
    assert GSM8K.buckets == ("1-3", "4-5", "6+")


@needs_shared
def test_gsm8k_conversations_carry_their_step_bucket(shared_env):
    task = GSM8K(split="test")
    assert task[0]["steps"] == solution_steps(task.rows[0]["answer"]) and task[0]["bucket"] == steps_bucket(task[0]["steps"])
    counts = Counter(task[i]["bucket"] for i in range(len(task)))
    assert counts == {"1-3": 697, "4-5": 472, "6+": 150}


# -----------------------------------------------------------------------------
# MMLU and ARC

def test_mmlu_subject_groups_cover_the_57_subjects():
    assert len(SUBJECT_GROUPS) == 57 and set(SUBJECT_GROUPS.values()) == set(GROUPS)
    assert Counter(SUBJECT_GROUPS.values()) == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert [subject_group(s) for s in ("college_physics", "anatomy", "professional_law", "econometrics")] == \
        ["STEM", "other", "humanities", "social sciences"]
    with pytest.raises(NanochatError, match="unknown subject 'astrology': not one of the 57 MMLU subjects"):
        subject_group("astrology")


@needs_shared
def test_mmlu_local_subjects_all_map_and_conversations_carry_their_group(shared_env):
    for folder in ("dev", "val", "test"):
        subjects = {p.name[: -len(f"_{folder}.csv")] for p in (SHARED / "tasks" / "mmlu" / folder).glob("*.csv")}
        assert subjects == set(SUBJECT_GROUPS), folder
    task = MMLU(split="dev")
    assert task.buckets == GROUPS
    assert all(c["bucket"] == SUBJECT_GROUPS[c["subject"]] for c in task)
    assert Counter(c["bucket"] for c in task) == {g: 5 * n for g, n in Counter(SUBJECT_GROUPS.values()).items()}
    aux = MMLU(split="auxiliary_train")  # other data sets, not the 57 subjects: no buckets
    assert aux.buckets is None and "bucket" not in aux[0]



@needs_shared
def test_mmlu_parsing(shared_env):
    assert [len(MMLU(split=s)) for s in ("dev", "validation", "test", "auxiliary_train")] == [285, 1531, 14042, 1218]
    task = MMLU(split="dev", subjects=["abstract_algebra"])
    assert len(task) == 5
    first = task[0]
    assert first["messages"][0]["content"] == (
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n\nA. 0\nB. 1\nC. 2\nD. 3\n\n"
        "Answer with the letter of the correct choice (A, B, C, D) only.")
    assert reply(first) == "B" and first["letters"] == ["A", "B", "C", "D"]
    assert first["subject"] == "abstract_algebra" and task.eval_type == "categorical"
    # A quoted CSV field with commas stays one choice.
    assert "A. True, True\nB. False, False" in task[1]["messages"][0]["content"]
    with pytest.raises(NanochatError, match="no dev data for subject.*astrology"):
        MMLU(split="dev", subjects=["astrology"])


@needs_shared
def test_multiple_choice_answer_checking(shared_env):
    task = MMLU(split="dev", subjects=["abstract_algebra"])
    conversation = task[0]  # answer B
    for completion, correct in [("B", True), ("B.", True), ("(B) 1", True), (" B\n", True),
                                ("The answer is B", True), ("C", False), ("", False), ("Both", False), ("E", False)]:
        assert task.evaluate(conversation, completion) is correct, completion
    assert extract_choice("answer: d", ["A", "B", "C", "D"]) == "D"


@needs_shared
def test_arc_parsing(shared_env):
    sizes = {("ARC-Easy", "train"): 2251, ("ARC-Easy", "validation"): 570, ("ARC-Easy", "test"): 2376,
             ("ARC-Challenge", "train"): 1056, ("ARC-Challenge", "validation"): 294, ("ARC-Challenge", "test"): 1172}
    for (subset, split), n in sizes.items():
        assert len(ARC(subset, split)) == n
    rows = [json.loads(line) for line in open(SHARED / "tasks" / "arc" / "ARC-Easy-Train.jsonl")]
    task = ARC("ARC-Easy", "train")
    numeric = next(i for i, r in enumerate(rows) if r["question"]["choices"][0]["label"] == "1")
    five = next(i for i, r in enumerate(rows) if len(r["question"]["choices"]) == 5)
    for i in (0, numeric, five):
        row, conversation = rows[i], task[i]
        labels = [c["label"] for c in row["question"]["choices"]]
        assert conversation["letters"] == list("ABCDE"[: len(labels)])
        assert reply(conversation) == conversation["letters"][labels.index(row["answerKey"])]
        assert conversation["messages"][0]["content"].startswith(row["question"]["stem"])
        assert task.evaluate(conversation, reply(conversation))
        assert not task.evaluate(conversation, next(x for x in conversation["letters"] if x != reply(conversation)))
    with pytest.raises(NanochatError, match="answerKey 'F' is not one of"):
        arc_row_from_original(dict(rows[0], answerKey="F"), "x.jsonl:1")
    for subset, bucket in (("ARC-Easy", "Easy"), ("ARC-Challenge", "Challenge")):
        task = ARC(subset, "test")
        assert task.buckets == (bucket,) and task[0]["bucket"] == task[-1]["bucket"] == bucket


# -----------------------------------------------------------------------------
# HumanEval

HUMANEVAL_SAMPLE = [10, 38, 53, 162]  # 10 and 38 use helpers from the prompt; 162 imports hashlib


@needs_shared
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(shared_env):
    task = HumanEval(timeout=5.0)
    assert len(task) == 164
    jobs = []
    for i in HUMANEVAL_SAMPLE:
        conversation = task[i]
        prompt, solution = conversation["messages"][0]["content"], reply(conversation)
        body = solution[len(prompt):]
        jobs += [(conversation, solution, True),                                       # full function
                 (conversation, f"Here you go:\n```python\n{solution}```\nDone.", True),  # fenced
                 (conversation, body, True),                                           # body only
                 (conversation, prompt + body.replace("return", "return None and", 1), False)]
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda job: task.evaluate(job[0], job[1]), jobs))
    assert outcomes == [expected for _, _, expected in jobs]


@needs_shared
def test_humaneval_redefining_only_the_entry_point_keeps_prompt_helpers(shared_env):
    conversation = HumanEval()[10]  # make_palindrome calls is_palindrome, defined in the prompt
    completion = ("def make_palindrome(string: str) -> str:\n"
                  "    for i in range(len(string) + 1):\n"
                  "        if is_palindrome(string[i:]):\n"
                  "            return string + string[:i][::-1]\n")
    assert HumanEval().evaluate(conversation, completion)


@needs_shared
def test_humaneval_hanging_or_hostile_completions_fail_cleanly(shared_env):
    task = HumanEval(timeout=0.5)
    conversation = task[0]
    hang = "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n"
    assert not task.evaluate(conversation, hang)
    assert not task.evaluate(conversation, "import os\nos.kill(os.getppid(), 9)\n")
    # Exiting with status 0 before the tests run is not a pass (an RL reward hack otherwise).
    assert not task.evaluate(conversation, "import sys\nsys.exit(0)\n")
    assert not task.evaluate(conversation, "import os\nos._exit(0)\n")
    assert task.reward(conversation, "syntax error (") == 0.0


@needs_shared
@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass(shared_env):
    task = HumanEval()
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda c: task.evaluate(c, reply(c)), task))
    assert all(outcomes), [task[i]["task_id"] for i, ok in enumerate(outcomes) if not ok]


# -----------------------------------------------------------------------------
# Chat conversations, CustomJSON, identity

@needs_shared
def test_smoltalk_reads_the_chat_dir_beside_the_tasks_dir(shared_env):
    train, test = SmolTalk("train"), SmolTalk("test")
    assert len(train) + len(test) == 43710
    assert len(test) == -(-43710 // TEST_EVERY)
    first_line = json.loads(open(SHARED / "chat" / "alpaca_eval.jsonl").readline())
    assert test[0] == {"messages": first_line["messages"]}  # held-out line 0 of the first file
    for conversation in (train[0], train[-1], test[-1]):
        assert conversation["messages"][0]["role"] == "user" and conversation["messages"][-1]["role"] == "assistant"
    only = SmolTalk("train", files=["self_instruct_human.jsonl"])
    assert len(only) == 427 - -(-427 // TEST_EVERY)
    with pytest.raises(NanochatError, match="no such chat file"):
        SmolTalk(files=["nope.jsonl"])


def test_smoltalk_reports_a_bad_line_with_file_and_line(tmp_path, monkeypatch):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{oops\n")
    monkeypatch.setenv("NANOCHAT_CHAT_DIR", str(tmp_path))
    with pytest.raises(NanochatError, match=rf"{re.escape(str(path))}:3: invalid JSON"):
        SmolTalk("train")  # when the task is made, not when the line is reached
    assert SmolTalk("test")[0] == good  # the held-out split (line 1) does not hold the bad line


BAD_CONVERSATIONS = [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"conversation": []}', "expected an object with a 'messages' list"),
    ('{"messages": []}', "'messages' is empty"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "message 0 has role 'assistant', expected 'user'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "message 1 has role 'user', expected 'assistant'"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "the last message must be from the assistant"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}',
     r"message 0 \(user\) content must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, '
     '{"role": "assistant", "content": [{"type": "bash", "text": "ls"}]}]}',
     "message 1 part 0 must be"),
    ('{"messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]}',
     "exactly 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
     "message 1 has role 'system'"),
]


@pytest.mark.parametrize("line,message", BAD_CONVERSATIONS)
def test_customjson_rejects_malformed_lines_naming_file_and_line(tmp_path, line, message):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path = tmp_path / "mine.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(NanochatError, match=rf"^{re.escape(str(path))}:3: .*{message}"):
        CustomJSON(str(path))


def test_customjson_accepts_system_tool_calls_and_bare_lists(tmp_path):
    conversations = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                        {"type": "python_output", "text": "4"},
                                                        {"type": "text", "text": "4"}]}], "source": "me"},
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye!"}],
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in conversations) + "\n")
    task = CustomJSON(str(path), start=1)
    assert len(task) == 1 and task[0] == {"messages": conversations[1]}
    assert CustomJSON(str(path))[0] == {"messages": conversations[0]["messages"]}
    with pytest.raises(NanochatError, match="no such file"):
        CustomJSON(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TypeError, match="training data only"):
        task.evaluate(task[0], "x")


def test_identity_default_file():
    task = Identity()
    assert len(task) >= 12
    assert all("nanochat" in json.dumps(c).lower() for c in list(task)[:5])
    assert any(c["messages"][0]["role"] == "system" for c in task)
    assert any(isinstance(reply(c), list) for c in task)  # shows the tool in use


# -----------------------------------------------------------------------------
# Spelling tasks

@needs_shared
def test_spellingbee_items_are_correct_and_deterministic(shared_env):
    task = SpellingBee(size=50, split="train")
    assert [task[i] for i in range(50)] == [SpellingBee(size=50, split="train")[i] for i in range(50)]
    assert task[0] != SpellingBee(size=50, split="test")[0]
    zero_seen = False
    for conversation in task:
        parts = reply(conversation)
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = parts[1]["text"].split("'")[1], parts[1]["text"].split("'")[3]
        assert word in conversation["messages"][0]["content"] and f"{letter}" in conversation["messages"][0]["content"]
        assert parts[2]["text"] == str(word.count(letter))
        assert parts[3]["text"].endswith(f"#### {word.count(letter)}")
        assert parts[0]["text"].startswith(f"Spelling out '{word}': {','.join(word)}\n")
        zero_seen |= word.count(letter) == 0
        assert task.evaluate(conversation, "".join(p["text"] for p in parts))
        assert not task.evaluate(conversation, f"#### {word.count(letter) + 1}")
    assert zero_seen  # absent letters are asked about too
    # The tool call in the data gives the data's output when really run.
    assert run_tool_call(reply(task[0])[1]["text"]) == reply(task[0])[2]["text"]


@needs_shared
def test_simplespelling(shared_env):
    task = SimpleSpelling(size=20, split="test")
    for conversation in task:
        word = reply(conversation).replace(",", "")
        assert word in conversation["messages"][0]["content"] and word.isalpha()
        assert task.evaluate(conversation, reply(conversation))
        assert task.evaluate(conversation, " ".join(word.upper()))
        assert not task.evaluate(conversation, ",".join(word[:-1]))


def test_word_list_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_WORDS_FILE", str(tmp_path / "missing.txt"))
    with pytest.raises(NanochatError, match=rf"SpellingBee: no word list at {re.escape(str(tmp_path))}/missing.txt"):
        SpellingBee()
    words = tmp_path / "words.txt"
    words.write_bytes(b"apple\r\nbanana\r\n")  # CRLF like words_alpha.txt
    task = SimpleSpelling(size=10, words_file=str(words))
    assert {reply(c) for c in task} <= {"a,p,p,l,e", "b,a,n,a,n,a"}


# -----------------------------------------------------------------------------
# Views, mixtures, sequences

class Numbers(Task):
    """A synthetic task whose example i is the conversation about the string f'{name}{i}'."""

    def __init__(self, name, n, **view):
        super().__init__(**view)
        self.name, self.n = name, n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.name}{index}"},
                             {"role": "assistant", "content": "ok"}]}


def ids(task):
    return [c["messages"][0]["content"] for c in task]


def test_task_views_slice_like_range():
    assert ids(Numbers("a", 10, start=2, stop=9, step=3)) == ["a2", "a5", "a8"]
    view = Numbers("a", 10, start=5)
    assert len(view) == 5 and ids([view[-1]]) == ["a9"]
    with pytest.raises(IndexError):
        view[5]
    assert len(Numbers("a", 3, stop=100)) == 3
    with pytest.raises(NanochatError, match="step must be >= 1"):
        Numbers("a", 3, step=0)


def test_mixture_with_weights_has_exact_proportions():
    tasks = [Numbers("a", 100), Numbers("b", 30), Numbers("c", 7)]
    mixture = TaskMixture(tasks, weights=[1, 2, 1], size=1000, seed=0)
    assert mixture.counts == [250, 500, 250] and len(mixture) == 1000
    assert Counter(x[0] for x in ids(mixture)) == {"a": 250, "b": 500, "c": 250}
    # Oversampled tasks repeat evenly: c has 7 examples drawn 250 times -> 35 or 36 each.
    assert set(Counter(x for x in ids(mixture) if x[0] == "c").values()) == {35, 36}
    # Largest-remainder rounding: counts always sum to size.
    assert TaskMixture(tasks, weights=[1, 1, 1], size=10).counts == [4, 3, 3]


def test_mixture_order_is_deterministic_and_shuffled():
    tasks = [Numbers("a", 50), Numbers("b", 50)]
    first, again = ids(TaskMixture(tasks, seed=7)), ids(TaskMixture(tasks, seed=7))
    other = ids(TaskMixture(tasks, seed=8))
    assert first == again and first != other
    assert sorted(first) == sorted(other) == sorted(ids(tasks[0]) + ids(tasks[1]))  # every example once
    assert first[:50] != ids(tasks[0])  # interleaved, not concatenated
    assert 15 < sum(x[0] == "a" for x in first[:50]) < 35


def test_mixture_counts_subsample_and_repeat():
    mixture = TaskMixture([Numbers("a", 10), Numbers("b", 4)], counts=[3, 10], seed=1)
    drawn = Counter(ids(mixture))
    assert sum(v for k, v in drawn.items() if k[0] == "a") == 3 and all(v == 1 for k, v in drawn.items() if k[0] == "a")
    assert sorted(v for k, v in drawn.items() if k[0] == "b") == [2, 2, 3, 3]
    assert TaskMixture([Numbers("a", 10), Numbers("b", 4)], counts=[None, 0]).counts == [10, 0]
    with pytest.raises(NanochatError, match="weights or counts, not both"):
        TaskMixture([Numbers("a", 1)], weights=[1], counts=[1])
    with pytest.raises(NanochatError, match="is empty"):
        TaskMixture([Numbers("a", 0)])
    assert mixture.task_of(0) in mixture.tasks


def test_sequence_concatenates_in_order():
    sequence = TaskSequence([Numbers("a", 2), Numbers("b", 3, start=1)])
    assert ids(sequence) == ["a0", "a1", "b1", "b2"]
    assert ids(TaskSequence([Numbers("a", 2), Numbers("b", 3)], start=1, step=2)) == ["a1", "b1"]


# -----------------------------------------------------------------------------
# Recipes

def write_identity_like(path, n):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(n)))


def test_recipe_json_with_counts_and_relative_paths(tmp_path):
    write_identity_like(tmp_path / "mine.jsonl", 5)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"seed": 3, "tasks": [
        {"task": "CustomJSON", "args": {"path": "mine.jsonl"}, "count": 12},
        {"task": "Identity"},
    ]}))
    mixture = load_recipe(str(recipe))
    assert mixture.counts == [12, len(Identity())] and mixture.seed == 3
    assert ids(mixture) == ids(load_recipe(str(recipe)))
    # 12 draws from 5 conversations: two full passes, then 2 more from a third.
    assert sorted(Counter(x for x in ids(mixture) if x.startswith("q")).values()) == [2, 2, 2, 3, 3]


def test_recipe_yaml_with_weights(tmp_path):
    pytest.importorskip("yaml")
    write_identity_like(tmp_path / "a.jsonl", 4)
    write_identity_like(tmp_path / "b.jsonl", 9)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("# a comment\nseed: 1\nsize: 30\ntasks:\n"
                      "  - task: CustomJSON\n    args: {path: a.jsonl}\n    weight: 2\n"
                      "  - task: CustomJSON\n    args: {path: b.jsonl, start: 1}\n    weight: 1\n")
    mixture = load_recipe(str(recipe))
    assert mixture.counts == [20, 10] and len(mixture.tasks[1]) == 8


@needs_shared
def test_shipped_recipes_load(shared_env):
    for name in ("mid.json", "sft.json", "sft_mix.yaml"):
        mixture = load_recipe(str(REPO / "tasks" / "recipes" / name))
        assert len(mixture) > 10_000
        validate_conversation(mixture[0], name)
    # sft_mix is by category: 20000 rows shared 2:1:1:1, identity on top in full
    shares = {name: target for name, target in mixture.categories.items() if target != "all"}
    assert mixture.categories["identity"] == "all" and shares["chat"] == pytest.approx(2 * shares["math"])
    assert sum(n for n, e in zip(mixture.counts, mixture.entries) if e["category"] != "identity") == 20_000


@needs_shared
def test_tasks_name_the_files_they_read(shared_env, base_dir):
    """Task.source_files(): what scripts/data.py hashes to tell a stale prepared data set."""
    tasks = SHARED / "tasks"
    assert GSM8K(split="test").source_files() == [str(tasks / "gsm8k" / "test.jsonl")]
    assert ARC("ARC-Easy", "train").source_files() == [str(tasks / "arc" / "ARC-Easy-Train.jsonl")]
    assert HumanEval().source_files() == [str(tasks / "humaneval" / "HumanEval.jsonl")]
    dev = MMLU(split="dev", subjects=["astronomy", "virology"]).source_files()
    assert [os.path.basename(p) for p in dev] == ["astronomy_dev.csv", "virology_dev.csv"]
    assert SmolTalk(files=["gpteacher.jsonl"]).source_files() == [str(SHARED / "chat" / "gpteacher.jsonl")]
    # generated tasks: their generator's module is a source, besides the word list
    assert SpellingBee(size=3).source_files() == [str(SHARED / "words" / "words_alpha.txt"), str(REPO / "tasks" / "spellingbee.py")]
    assert MultiHop(size=3).source_files() == [str(REPO / "tasks" / "multihop.py")]
    mixture = TaskMixture([Identity(), SpellingBee(size=3), SimpleSpelling(size=3)])
    assert mixture.source_files() == [DEFAULT_IDENTITY_FILE, str(SHARED / "words" / "words_alpha.txt"), str(REPO / "tasks" / "spellingbee.py")]


MALFORMED_RECIPES = [
    ("r.json", '["GSM8K"]', "the recipe must be a mapping"),
    ("r.json", '{"tasks": [{"task": "Identity"}], "sed": 1}', "unknown key\\(s\\) 'sed'"),
    ("r.json", '{"seed": 1}', "'tasks' must be a non-empty list"),
    ("r.json", '{"tasks": [{"task": "Identiti"}]}', "tasks\\[0\\]: unknown task 'Identiti' \\(known: ARC, "),
    ("r.json", '{"tasks": [{"task": "Identity", "args": {"pth": "x"}}]}',
     "tasks\\[0\\] \\(Identity\\): unknown argument\\(s\\) 'pth' \\(Identity takes path, start, stop, step\\)"),
    ("r.json", '{"tasks": [{"task": "CustomJSON"}]}', "tasks\\[0\\] \\(CustomJSON\\): missing argument\\(s\\) 'path'"),
    ("r.json", '{"tasks": [{"task": "Identity", "weight": -1}]}', "weight must be a positive number, got -1"),
    ("r.json", '{"tasks": [{"task": "Identity", "count": 2.5}]}', "count must be an int >= 0, got 2.5"),
    ("r.json", '{"tasks": [{"task": "Identity", "weight": 1, "count": 2}]}', "give 'weight' or 'count', not both"),
    ("r.json", '{"tasks": [{"task": "Identity", "weight": 1}, {"task": "Identity"}]}',
     "either every task has a 'weight' or none does"),
    ("r.json", '{"size": 10, "tasks": [{"task": "Identity"}]}', "'size' only applies when the tasks have weights"),
    ("r.json", '{"tasks": [{"task": "Identity", "args": {"path": "missing.jsonl"}}]}',
     "tasks\\[0\\] \\(Identity\\): Identity: no such file .*missing.jsonl"),
    ("r.json", '{"tasks": [{"task": "SpellingBee", "args": {"split": "dev"}}]}',
     "SpellingBee: split must be one of 'train', 'test', got 'dev'"),
    ("r.json", '{"tasks": [\n{"task": "Identity",}]}', ":2: invalid JSON"),
    ("r.yaml", "tasks: [unclosed", "invalid YAML"),
    ("r.toml", "tasks = []", "a recipe must be a .json, .yaml or .yml file"),
]


@pytest.mark.parametrize("name,text,message", MALFORMED_RECIPES)
def test_malformed_recipes_name_the_file_and_the_problem(tmp_path, monkeypatch, name, text, message):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    monkeypatch.setenv("NANOCHAT_WORDS_FILE", str(tmp_path / "words.txt"))
    (tmp_path / "words.txt").write_text("apple\n")
    path = tmp_path / name
    path.write_text(text)
    # Messages start with the file (and a line number where the parser gives one).
    where = re.escape(str(path)) + ("" if message.startswith(":") else ": .*")
    with pytest.raises(NanochatError, match=rf"^{where}{message}"):
        load_recipe(str(path))


def test_yaml_recipe_without_pyyaml_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    path = tmp_path / "r.yaml"
    path.write_text("tasks: []\n")
    with pytest.raises(NanochatError, match="YAML recipes need PyYAML .* or write the recipe as .json"):
        load_recipe(str(path))


# -----------------------------------------------------------------------------
# Loading: local data missing -> hub -> one-line error

def test_missing_local_data_without_datasets_names_task_and_path(empty_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    for make, task, local in [(lambda: GSM8K(split="test"), "GSM8K", "gsm8k/test.jsonl"),
                              (lambda: MMLU(split="validation"), "MMLU", "mmlu/val"),
                              (lambda: ARC("ARC-Challenge", "train"), "ARC", "arc/ARC-Challenge-Train.jsonl"),
                              (lambda: HumanEval(), "HumanEval", "humaneval/HumanEval.jsonl"),
                              (lambda: SmolTalk(), "SmolTalk", "chat")]:
        path = os.path.normpath(os.path.join(empty_env, local)) if local != "chat" else str(empty_env.parent / "chat")
        with pytest.raises(NanochatError, match=rf"^{task}: no local data at {re.escape(path)} .*`datasets` package"):
            make()


def test_hub_failure_is_one_line_naming_task_and_path(empty_env, monkeypatch):
    def load_dataset(path, name=None, split=None):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore detail")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(NanochatError) as info:
        GSM8K(split="train")
    message = str(info.value)
    assert message.startswith(f"GSM8K: no local data at {empty_env}/gsm8k/train.jsonl")
    assert "loading openai/gsm8k from the Hugging Face hub failed: Couldn't reach" in message
    assert "\n" not in message


@needs_shared
def test_hub_rows_give_the_same_conversations_as_local_files(empty_env, monkeypatch):
    # A stand-in hub serving the shared files in the hub's schemas: each task must turn hub rows
    # into exactly the conversations it builds from the local files.
    data = SHARED / "tasks"
    mmlu_rows = [row for path in sorted((data / "mmlu" / "dev").glob("*.csv"))
                 for row in read_mmlu_csv(str(path), path.name[: -len("_dev.csv")])]
    arc_rows = [arc_row_from_original(json.loads(line), "arc") for line in open(data / "arc" / "ARC-Easy-Dev.jsonl")]
    hub = {
        ("openai/gsm8k", "main", "test"): [json.loads(line) for line in open(data / "gsm8k" / "test.jsonl")],
        ("cais/mmlu", "all", "dev"): mmlu_rows,
        ("allenai/ai2_arc", "ARC-Easy", "validation"): arc_rows,
        ("openai/openai_humaneval", None, "test"): [json.loads(line)
                                                    for line in open(data / "humaneval" / "HumanEval.jsonl")],
        ("HuggingFaceTB/smol-smoltalk", None, "test"): [{"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "hello"}]}],
    }
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return hub[(path, name, split)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub_tasks = [GSM8K(split="test"), MMLU(split="dev"), ARC("ARC-Easy", "validation"), HumanEval()]
    assert calls == list(hub)[:4]
    local_tasks = [GSM8K(split="test", tasks_dir=str(data)), MMLU(split="dev", tasks_dir=str(data)),
                   ARC("ARC-Easy", "validation", tasks_dir=str(data)), HumanEval(tasks_dir=str(data))]
    for hub_task, local_task in zip(hub_tasks, local_tasks):
        assert len(hub_task) == len(local_task)
        assert list(hub_task) == list(local_task)
    assert SmolTalk("test")[0]["messages"][1]["content"] == "hello"
