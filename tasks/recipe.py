"""
Mixture recipes: a small JSON or YAML file that describes a TaskMixture, so that a user changes
the training data without touching code. YAML needs PyYAML (`pip install pyyaml`); JSON always works.

    {"seed": 42,                      # optional, default 42: the order of the mixture
     "size": 100000,                  # optional, only with weights: total number of examples
     "tasks": [
       {"task": "SmolTalk", "args": {"split": "train"}, "weight": 3},
       {"task": "GSM8K", "args": {"split": "train"}, "weight": 1},
       {"task": "CustomJSON", "args": {"path": "my_chats.jsonl"}}]}

Each entry names a task class (TASKS below) and its constructor arguments; a "path" argument is
relative to the recipe file. Per entry: "weight" (all entries weighted, split `size` in proportion),
or "count" (that many examples, repeating or subsampling), or neither (every example once);
weights cannot be mixed with counts or with unweighted entries.
A malformed recipe raises NanochatError("<file>: <what is wrong>").

The task registries live here, next to each other: TASKS (recipe names -> classes), the chat
evaluation suite CHAT_TASKS (ChatCORE's), the tasks evaluated on request besides (EVAL_TASKS) and
load_chat_task(name). The library (nanochat/) never imports tasks/: scripts build task objects here
and hand them to it.
"""

import inspect
import json
import os

from nanochat.common import NanochatError
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON, Identity
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.multihop import MultiHop
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

TASKS = {cls.__name__: cls for cls in (ARC, CustomJSON, GSM8K, HumanEval, Identity, MMLU, MultiHop,
                                       SimpleSpelling, SmolTalk, SpellingBee)}
PATH_ARGS = ("path", "words_file")  # resolved relative to the recipe file's directory

# The chat evaluation suite (scripts/chat_eval.py, chat_rl; ChatCORE is the mean over all of them):
# name -> (task class, arguments) of its evaluation split. SpellingBee is synthetic: 256 test
# problems, nanochat's number.
CHAT_EVAL_SPLITS = {
    "ARC-Easy": (ARC, {"subset": "ARC-Easy", "split": "test"}),
    "ARC-Challenge": (ARC, {"subset": "ARC-Challenge", "split": "test"}),
    "MMLU": (MMLU, {"split": "test"}),
    "GSM8K": (GSM8K, {"split": "test"}),
    "HumanEval": (HumanEval, {}),
    "SpellingBee": (SpellingBee, {"size": 256, "split": "test"}),
}
CHAT_TASKS = tuple(CHAT_EVAL_SPLITS)
# Evaluated on request only (scripts/chat_eval.py --tasks), outside ChatCORE: its suite stays the six
# above, so that ChatCORE remains comparable with earlier runs. MultiHop is generated: no data files.
EXTRA_EVAL_SPLITS = {
    "MultiHop": (MultiHop, {"split": "test"}),
}
EVAL_TASKS = CHAT_TASKS + tuple(EXTRA_EVAL_SPLITS)


def load_chat_task(name, tasks_dir=None):
    """The evaluation split of the chat task `name` (one of EVAL_TASKS), a Task with an eval_type.
    tasks_dir goes to the tasks that read data files (a generated task takes none).
    Raises NanochatError for an unknown name or missing data."""
    splits = CHAT_EVAL_SPLITS | EXTRA_EVAL_SPLITS
    if name not in splits:
        raise NanochatError(f"unknown chat task {name!r}; expected one of {', '.join(EVAL_TASKS)}")
    cls, args = splits[name]
    if "tasks_dir" in inspect.signature(cls).parameters:
        args = args | {"tasks_dir": tasks_dir}
    return cls(**args)


def load_recipe(path, tasks_dir=None):
    """Parse the recipe file at `path` (.json, .yaml or .yml) and build its TaskMixture."""
    if not os.path.isfile(path):
        raise NanochatError(f"no such recipe file {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    extension = os.path.splitext(path)[1].lower()
    if extension == ".json":
        try:
            recipe = json.loads(text)
        except json.JSONDecodeError as e:
            raise NanochatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    elif extension in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise NanochatError(f"{path}: YAML recipes need PyYAML (pip install pyyaml); "
                                "or write the recipe as .json") from None
        try:
            recipe = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise NanochatError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    else:
        raise NanochatError(f"{path}: a recipe must be a .json, .yaml or .yml file")
    return build_mixture(recipe, path, tasks_dir)


def build_mixture(recipe, where, tasks_dir=None):
    """
    Build the TaskMixture a parsed recipe (dict) describes. `where` is the recipe's file path, used
    in error messages and to resolve relative "path" arguments.
    """
    def fail(message):
        raise NanochatError(f"{where}: {message}")

    if not isinstance(recipe, dict):
        fail("the recipe must be a mapping with a 'tasks' list")
    unknown = sorted(set(recipe) - {"seed", "size", "tasks"})
    if unknown:
        fail(f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: seed, size, tasks)")
    seed, size, entries = recipe.get("seed", 42), recipe.get("size"), recipe.get("tasks")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        fail(f"seed must be an int >= 0, got {seed!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        fail(f"size must be an int >= 1, got {size!r}")
    if not isinstance(entries, list) or not entries:
        fail("'tasks' must be a non-empty list")

    tasks, weights, counts = [], [], []
    for i, entry in enumerate(entries):
        at = f"tasks[{i}]"
        if not isinstance(entry, dict) or "task" not in entry:
            fail(f"{at} must be a mapping with a 'task' name")
        unknown = sorted(set(entry) - {"task", "args", "weight", "count"})
        if unknown:
            fail(f"{at}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: task, args, weight, count)")
        name, args = entry["task"], entry.get("args", {})
        if name not in TASKS:
            fail(f"{at}: unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
        at = f"{at} ({name})"
        if not isinstance(args, dict):
            fail(f"{at}: 'args' must be a mapping")
        if "weight" in entry and "count" in entry:
            fail(f"{at}: give 'weight' or 'count', not both")
        weight, count = entry.get("weight"), entry.get("count")
        if "weight" in entry and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0):
            fail(f"{at}: weight must be a positive number, got {weight!r}")
        if "count" in entry and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            fail(f"{at}: count must be an int >= 0, got {count!r}")
        weights.append(weight)
        counts.append(count)
        tasks.append(_build_task(TASKS[name], dict(args), where, at, tasks_dir))

    weighted = [w is not None for w in weights]
    if any(weighted) and not all(weighted):
        fail("either every task has a 'weight' or none does (use 'count' for fixed numbers of examples)")
    if size is not None and not all(weighted):
        fail("'size' only applies when the tasks have weights")
    try:
        if all(weighted):
            return TaskMixture(tasks, weights=weights, size=size, seed=seed)
        return TaskMixture(tasks, counts=counts, seed=seed)
    except NanochatError as e:
        fail(str(e))


def _build_task(cls, args, where, at, tasks_dir):
    for key in PATH_ARGS:
        if isinstance(args.get(key), str):
            args[key] = os.path.join(os.path.dirname(os.path.abspath(where)), os.path.expanduser(args[key]))
    parameters = inspect.signature(cls).parameters
    # Every task takes the view arguments start/stop/step (through **view) besides its own.
    allowed = [p for p in parameters if p not in ("view", "tasks_dir")] + ["start", "stop", "step"]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise NanochatError(f"{where}: {at}: unknown argument(s) {', '.join(map(repr, unknown))} "
                            f"({cls.__name__} takes {', '.join(allowed)})")
    required = [p.name for p in parameters.values() if p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD]
    missing = [p for p in required if p not in args]
    if missing:
        raise NanochatError(f"{where}: {at}: missing argument(s) {', '.join(map(repr, missing))}")
    if "tasks_dir" in parameters:
        args["tasks_dir"] = tasks_dir
    try:
        return cls(**args)
    except NanochatError as e:
        raise NanochatError(f"{where}: {at}: {e}") from None
