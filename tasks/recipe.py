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

Or by category: every entry belongs to a category ("category": NAME, default its task name) and a
top-level "categories" gives each category "all" (every example of its entries once) or a weight:
the weighted categories share `size` examples (then required) in proportion to their weights, and a
category's examples are split among its entries in proportion to the entries' lengths. Weights are
shares of examples, not of tokens (scripts/data.py prints both). Per-entry weight/count cannot be
combined with "categories".

    {"size": 20000,
     "categories": {"chat": 3, "math": 1, "identity": "all"},
     "tasks": [
       {"task": "SmolTalk", "category": "chat"},
       {"task": "GSM8K", "args": {"split": "train"}, "category": "math"},
       {"task": "Identity", "category": "identity"}]}

A malformed recipe raises NanochatError("<file>: <key or entry>: <what is wrong>"), one line.

The task registries live here, next to each other: TASKS (recipe names -> classes), the chat
evaluation suite CHAT_TASKS (ChatCORE's), the tasks evaluated on request besides (EVAL_TASKS) and
load_chat_task(name). The library (nanochat/) never imports tasks/: scripts build task objects here
and hand them to it.
"""

import inspect
import json
import os
from numbers import Real

from nanochat.common import NanochatError
from tasks.arc import ARC
from tasks.common import TaskMixture, split_by_weights
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


class RecipeMixture(TaskMixture):
    """
    The TaskMixture of a recipe, with what the recipe said about each entry:
    entries: one dict per task, {"task": name, "category": str, "args": dict as written,
        "weight": the entry's weight, count, or its category's setting (a number or "all")};
    categories: {name: "all" | target share of the mixture's examples (float in [0, 1])}.
    """

    def __init__(self, tasks, entries, categories, **mixture):
        super().__init__(tasks, **mixture)
        self.entries, self.categories = entries, categories


def build_mixture(recipe, where, tasks_dir=None):
    """
    Build the RecipeMixture a parsed recipe (dict) describes. `where` is the recipe's file path, used
    in error messages and to resolve relative "path" arguments.
    """
    def fail(message):
        raise NanochatError(f"{where}: {message}")

    if not isinstance(recipe, dict):
        fail("the recipe must be a mapping with a 'tasks' list")
    unknown = sorted(set(recipe) - {"seed", "size", "tasks", "categories"})
    if unknown:
        fail(f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: seed, size, tasks, categories)")
    seed, size, entries = recipe.get("seed", 42), recipe.get("size"), recipe.get("tasks")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        fail(f"seed must be an int >= 0, got {seed!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        fail(f"size must be an int >= 1, got {size!r}")
    if not isinstance(entries, list) or not entries:
        fail("'tasks' must be a non-empty list")
    categories = recipe.get("categories")
    if categories is not None:
        if not isinstance(categories, dict) or not categories:
            fail("categories: must be a non-empty mapping of category name to 'all' or a positive weight")
        for name, setting in categories.items():
            if setting != "all" and (isinstance(setting, bool) or not isinstance(setting, Real) or not setting > 0):
                fail(f"categories: {name}: must be 'all' or a positive number, got {setting!r}")

    tasks, weights, counts, described = [], [], [], []
    for i, entry in enumerate(entries):
        at = f"tasks[{i}]"
        if not isinstance(entry, dict) or "task" not in entry:
            fail(f"{at} must be a mapping with a 'task' name")
        unknown = sorted(set(entry) - {"task", "args", "category", "weight", "count"})
        if unknown:
            fail(f"{at}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: task, args, category, weight, count)")
        name, args = entry["task"], entry.get("args", {})
        if name not in TASKS:
            fail(f"{at}: unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
        at = f"{at} ({name})"
        if not isinstance(args, dict):
            fail(f"{at}: 'args' must be a mapping")
        category = entry.get("category", name)
        if not isinstance(category, str) or not category:
            fail(f"{at}: category must be a non-empty string, got {category!r}")
        if categories is not None:
            for key in ("weight", "count"):
                if key in entry:
                    fail(f"{at}: {key}: a per-entry {key} cannot be combined with top-level 'categories' "
                         "(give the entry's category a weight instead)")
            if category not in categories:
                fail(f"{at}: category {category!r} is not in 'categories' (known: {', '.join(map(str, categories))})")
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
        setting = categories[category] if categories is not None else weight if weight is not None else count
        described.append({"task": name, "category": category, "args": args, "weight": "all" if setting is None else setting})

    def mixture(**how):
        try:
            return RecipeMixture(tasks, described, {}, seed=seed, **how)
        except NanochatError as e:
            fail(str(e))

    if categories is not None:
        mix = mixture(counts=_category_counts(categories, [d["category"] for d in described], tasks, size, fail))
    else:
        weighted = [w is not None for w in weights]
        if any(weighted) and not all(weighted):
            fail("either every task has a 'weight' or none does (use 'count' for fixed numbers of examples)")
        if size is not None and not all(weighted):
            fail("'size' only applies when the tasks have weights")
        mix = mixture(weights=weights, size=size) if all(weighted) else mixture(counts=counts)
    mix.categories = _category_targets(categories, described, weights, size, len(mix))
    return mix


def _category_counts(categories, of_entry, tasks, size, fail):
    """Examples per entry of a recipe with categories (module docstring)."""
    unused = [name for name in categories if name not in of_entry]
    if unused:
        fail(f"categories: {unused[0]}: no entry in 'tasks' has this category")
    weighted = [name for name, setting in categories.items() if setting != "all"]
    if weighted and size is None:
        fail("size: required when a category has a weight (the number of examples the weighted categories share)")
    if size is not None and not weighted:
        fail("size: only applies when a category has a weight")
    lengths = [len(task) for task in tasks]
    for task, n in zip(tasks, lengths):
        if n == 0:
            fail(f"task {type(task).__name__} is empty")
    per_category = dict(zip(weighted, split_by_weights([categories[c] for c in weighted], size, len(weighted)) if weighted else []))
    counts = list(lengths)  # "all": every example once
    for name, total in per_category.items():
        members = [i for i, c in enumerate(of_entry) if c == name]
        for i, n in zip(members, split_by_weights([lengths[i] for i in members], total, len(members))):
            counts[i] = n
    return counts


def _category_targets(categories, described, weights, size, total):
    """{category: "all" | the share of the mixture's examples the recipe asks for}."""
    targets = {}
    if categories is not None:
        weight_sum = sum(w for w in categories.values() if w != "all")
        for name, setting in categories.items():
            targets[name] = "all" if setting == "all" else size * setting / weight_sum / max(total, 1)
        return targets
    weight_sum = sum(w for w in weights if w is not None)
    for d, weight in zip(described, weights):
        name, setting = d["category"], d["weight"]
        if setting == "all" or targets.get(name) == "all":
            targets[name] = "all"
        else:
            asked = (size or total) * weight / weight_sum if weight is not None else setting
            targets[name] = targets.get(name, 0.0) + asked / max(total, 1)
    return targets


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
