"""
The CORE metric of DCLM (Li et al. 2024, "DataComp-LM", section 3.5 and appendix G): 22 in-context
learning tasks scored the way llm-foundry's ICL evaluator scores them, each task's accuracy centred
by its random-guessing baseline, averaged. nanochat reports it for base models (GPT-2 1.5B: 0.2565).

Data: an eval dir holding `core_tasks.tsv` (the task table, one row per task) and the llm-foundry
jsonl files it names (../shared/data/eval/core, README there). Eval dir: the `eval_dir` argument
(a script's --eval-dir) > $NANOCHAT_EVAL_DIR > $NANOCHAT_DATA_ROOT/eval/core > <base_dir>/eval_bundle.
A task whose file is absent (or empty) is reported as missing and CORE is averaged over the tasks
present; the result says so (`tasks_present`, `tasks_missing`, `note`).

Prompt format (documented in full in docs/core.md). Every string of an item is stripped of
surrounding whitespace first (llm-foundry's strip_dataset). One demonstration is
    <context><continuation_delimiter><answer>
demonstrations are joined by "\\n\\n" and followed, after another "\\n\\n", by the test item's
    <context><continuation_delimiter>
right-stripped of whitespace: that is the context. The continuation is " " + answer (the space a
word carries in running text with a GPT-style BPE; llm-foundry's prefix_space). Per task type:
- multiple_choice {query, choices, gold}: context = query (the same for every choice), answer =
  each choice (demonstrations use choices[gold]). Chosen: the lowest mean loss per continuation
  token.
- schema {context_options, continuation, gold}: context = each option, answer = continuation (the
  same for every option; demonstrations use context_options[gold]). Chosen: as multiple_choice
  (partial scoring, Trinh & Le 2018).
- language_modeling {context, continuation}: correct iff greedy decoding (argmax at every position,
  teacher-forced) reproduces every continuation token.
Token ids: [<|bos|>] + encode(context) + encode(continuation). When an item's longest row is longer
than the model's sequence_len, every row of the item loses the same number of context tokens right
after <|bos|> so that the longest fits (the continuation is kept whole unless it alone is longer).
Demonstrations are drawn per item from the other items of the same file with
random.Random(fewshot_seed + item_index): the prompt of an item does not depend on max_per_task,
the rank or the order of evaluation. The rows of one item are scored in one batched forward pass
(after one pass over the prefix they share, through a KV cache).
"""

import csv
import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import NanochatError, get_base_dir, resolve_data_path

TASK_TABLE = "core_tasks.tsv"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
BASELINE_VERSIONS = ("v1", "v2")  # v1: DCLM before its Sept-2025 fix, the published CORE numbers
EXAMPLE_DELIMITER = "\n\n"  # between demonstrations and before the test item
FEWSHOT_SEED = 1234  # llm-foundry's fewshot_random_seed
SUBSET_SEED = 1337  # which items a max_per_task subset takes
TABLE_COLUMNS = ("label", "file", "task_type", "num_fewshot", "continuation_delimiter", "random_baseline_v1", "random_baseline_v2")


@dataclass(frozen=True)
class CoreTask:
    """One row of core_tasks.tsv. Baselines are fractions in [0, 1) (e.g. 0.25 for 4 choices)."""

    label: str
    file: str  # relative to the eval dir
    task_type: str  # one of TASK_TYPES
    num_fewshot: int
    continuation_delimiter: str
    random_baseline_v1: float
    random_baseline_v2: float

    def random_baseline(self, version="v1"):
        return self.random_baseline_v1 if version == "v1" else self.random_baseline_v2


@dataclass(frozen=True)
class Prompt:
    """The rows scored for one item: row i is contexts[i] followed by continuations[i]."""

    contexts: list
    continuations: list
    gold: int  # index of the correct row (always 0 for language_modeling)


# ------------------------------------------------------------------------------------------------
# data


def get_eval_dir(eval_dir=None):
    """The CORE eval dir: eval_dir (a --eval-dir flag) > $NANOCHAT_EVAL_DIR > $NANOCHAT_DATA_ROOT/eval/core >
    <base_dir>/eval_bundle. Raises NanochatError if it does not exist."""
    path = resolve_data_path(eval_dir, "NANOCHAT_EVAL_DIR", os.path.join("eval", "core"),
                             lambda: os.path.join(get_base_dir(), "eval_bundle"))
    if not os.path.isdir(path):
        raise NanochatError(f"CORE eval dir not found: {path} (pass --eval-dir, or set NANOCHAT_EVAL_DIR to a directory with {TASK_TABLE} or NANOCHAT_DATA_ROOT to one with eval/core/, e.g. shared/data)")
    return path


def load_task_table(eval_dir):
    """The tasks of <eval_dir>/core_tasks.tsv (tab-separated, header row, continuation_delimiter
    JSON-encoded). Returns list[CoreTask]. Raises NanochatError naming the file and line at fault."""
    path = os.path.join(eval_dir, TASK_TABLE)
    if not os.path.isfile(path):
        raise NanochatError(f"CORE task table not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in TABLE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise NanochatError(f"{path}: header lacks column(s) {', '.join(missing)}")
        tasks = []
        for lineno, row in enumerate(reader, 2):
            try:
                task = CoreTask(
                    label=row["label"],
                    file=row["file"],
                    task_type=row["task_type"],
                    num_fewshot=int(row["num_fewshot"]),
                    continuation_delimiter=json.loads(row["continuation_delimiter"]),
                    random_baseline_v1=float(row["random_baseline_v1"]),
                    random_baseline_v2=float(row["random_baseline_v2"]),
                )
            except (TypeError, ValueError) as e:
                raise NanochatError(f"{path}:{lineno}: malformed row ({e})") from None
            if task.task_type not in TASK_TYPES:
                raise NanochatError(f"{path}:{lineno}: unknown task_type {task.task_type!r}; expected one of {', '.join(TASK_TYPES)}")
            if not isinstance(task.continuation_delimiter, str) or task.num_fewshot < 0:
                raise NanochatError(f"{path}:{lineno}: continuation_delimiter must be a JSON string and num_fewshot >= 0")
            if not all(0.0 <= b < 1.0 for b in (task.random_baseline_v1, task.random_baseline_v2)):
                raise NanochatError(f"{path}:{lineno}: random baselines must be fractions in [0, 1)")
            tasks.append(task)
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise NanochatError(f"{path}: duplicate task labels")
    if not tasks:
        raise NanochatError(f"{path}: no tasks")
    return tasks


def _strings(value):
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(s, str) for s in value)


def _normalize_item(item, task_type):
    """Strip every string (llm-foundry strip_dataset) and check the fields of the task type; returns
    the item or raises TypeError / ValueError with the reason."""
    if not isinstance(item, dict):
        raise TypeError("not a JSON object")
    if task_type == "multiple_choice":
        if not isinstance(item.get("query"), str) or not _strings(item.get("choices")):
            raise ValueError("multiple_choice needs a string 'query' and a list of >= 2 string 'choices'")
        out = {"query": item["query"].strip(), "choices": [c.strip() for c in item["choices"]], "gold": item.get("gold")}
        n = len(out["choices"])
    elif task_type == "schema":
        if not isinstance(item.get("continuation"), str) or not _strings(item.get("context_options")):
            raise ValueError("schema needs a list of >= 2 string 'context_options' and a string 'continuation'")
        out = {"context_options": [c.strip() for c in item["context_options"]], "continuation": item["continuation"].strip(), "gold": item.get("gold")}
        n = len(out["context_options"])
    else:
        if not isinstance(item.get("context"), str) or not isinstance(item.get("continuation"), str):
            raise ValueError("language_modeling needs string 'context' and 'continuation'")
        return {"context": item["context"].strip(), "continuation": item["continuation"].strip()}
    if not isinstance(out["gold"], int) or isinstance(out["gold"], bool) or not 0 <= out["gold"] < n:
        raise ValueError(f"'gold' must be an int in [0, {n})")
    return out


_ITEMS_CACHE = {}  # (path, task_type) -> (mtime_ns, size, items): base_train evaluates CORE repeatedly


def load_items(path, task_type):
    """The items of one llm-foundry jsonl file (one JSON object per line; blank lines skipped),
    strings stripped. Raises NanochatError naming the file and line of a malformed item."""
    st = os.stat(path)
    cached = _ITEMS_CACHE.get((path, task_type))
    if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2]
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(_normalize_item(json.loads(line), task_type))
            except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
                raise NanochatError(f"{path}:{lineno}: bad {task_type} item: {e}") from None
    _ITEMS_CACHE[(path, task_type)] = (st.st_mtime_ns, st.st_size, items)
    return items


# ------------------------------------------------------------------------------------------------
# prompts


def fewshot_indices(num_items, num_fewshot, index, seed=FEWSHOT_SEED):
    """
    The demonstrations of item `index`: min(num_fewshot, num_items - 1) distinct indices into the
    task's items, never `index` itself, drawn with random.Random(seed + index) (so independent of
    which other items are evaluated, and of the rank).
    """
    k = min(num_fewshot, num_items - 1)
    if k <= 0:
        return []
    picks = random.Random(seed + index).sample(range(num_items - 1), k)
    return [j + (j >= index) for j in picks]  # skip over `index`: uniform over the other items


def _demonstration(task, item):
    if task.task_type == "multiple_choice":
        return item["query"] + task.continuation_delimiter + item["choices"][item["gold"]]
    if task.task_type == "schema":
        return item["context_options"][item["gold"]] + task.continuation_delimiter + item["continuation"]
    return item["context"] + task.continuation_delimiter + item["continuation"]


def render_prompt(task, items, index, seed=FEWSHOT_SEED):
    """The texts scored for items[index] (format in the module docstring). Returns a Prompt."""
    item = items[index]
    shots = "".join(_demonstration(task, items[j]) + EXAMPLE_DELIMITER for j in fewshot_indices(len(items), task.num_fewshot, index, seed))

    def context(text):
        return (shots + text + task.continuation_delimiter).rstrip()

    if task.task_type == "multiple_choice":
        ctx = context(item["query"])
        return Prompt([ctx] * len(item["choices"]), [" " + c for c in item["choices"]], item["gold"])
    if task.task_type == "schema":
        n = len(item["context_options"])
        return Prompt([context(c) for c in item["context_options"]], [" " + item["continuation"]] * n, item["gold"])
    return Prompt([context(item["context"])], [" " + item["continuation"]], 0)


def tokenize_prompt(tokenizer, prompt, max_len):
    """
    Token rows for a Prompt: list of (ids, start), ids = [bos] + encode(context) + encode(continuation),
    the continuation being ids[start:]. When the longest row is longer than max_len, every row of
    the item loses the same number of tokens after <|bos|> (enough for the longest to fit), so the
    rows of a multiple-choice item keep the same context and still share their prefix.
    """
    contexts = tokenizer.encode(prompt.contexts)
    continuations = tokenizer.encode(prompt.continuations)
    rows = [([tokenizer.bos_token_id] + ctx + cont, 1 + len(ctx)) for ctx, cont in zip(contexts, continuations)]
    cut = max(len(ids) for ids, _ in rows) - max_len
    if cut > 0:
        rows = [(ids[:1] + ids[1 + cut :], max(1, start - cut)) for ids, start in rows]
    return rows


# ------------------------------------------------------------------------------------------------
# scoring


def shared_prefix_len(rows):
    """Length of the token prefix common to all rows, at most min(start): every scored position
    (start - 1 onwards) is then the prefix's last position or after it."""
    n = min(start for _, start in rows)
    first = rows[0][0]
    for ids, _ in rows[1:]:
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return n


@torch.no_grad()
def score_rows(model, rows, device, pad_id=0, share_prefix=True):
    """
    Score the token rows of one item. rows: list of (ids, start) with 1 <= start < len(ids).
    Returns (mean_nats fp32 [B]: mean cross-entropy in nats of the continuation tokens ids[start:],
    exact bool [B]: the argmax at every continuation position equals the token), on the CPU.

    model: a nanochat GPT or anything with its interface: model(idx int64 [B, T], kv_cache=None)
    -> fp32 logits [B, T, V], and the config engine.KVCache.for_model reads. The rows are scored
    in one batched forward pass, right-padded with pad_id (causal attention: padding after a row's
    end cannot change its logits). With share_prefix and several rows sharing a prefix of P > 1
    tokens (multiple choice: the whole few-shot context), the prefix is run once (batch 1) into a
    KV cache that the batched pass over the rows' remaining tokens continues from: the same logits
    for a fraction of the FLOPs (measured 2.7x faster on 10-shot arc_easy; docs/core.md).
    """
    B = len(rows)
    P = shared_prefix_len(rows) if share_prefix and B > 1 else 0
    if P <= 1:
        P = 0
    # Positions P - 1 .. T - 2 are run and scored: targets[b, t] is the token that logits[b, t]
    # predict (position P - 1 + t + 1 of row b) where it belongs to the continuation, else -1.
    T = max(len(ids) for ids, _ in rows)
    first = max(P - 1, 0)
    idx = torch.full((B, T - P), pad_id, dtype=torch.long)
    targets = torch.full((B, T - 1 - first), -1, dtype=torch.long)
    for b, (ids, start) in enumerate(rows):
        row = torch.tensor(ids, dtype=torch.long)
        idx[b, : len(ids) - P] = row[P:]
        targets[b, start - 1 - first : len(ids) - 1 - first] = row[start:]
    idx, targets = idx.to(device), targets.to(device)
    if P:
        from nanochat.engine import KVCache  # the inference cache; only this path needs it

        cache = KVCache.for_model(model, 1, T)
        prefix_logits = model(torch.tensor([rows[0][0][:P]], dtype=torch.long, device=device), kv_cache=cache)[:, -1:]
        logits = torch.cat([prefix_logits.expand(B, -1, -1), model(idx, kv_cache=cache.expand(B))], dim=1)[:, :-1]
    else:
        logits = model(idx)[:, :-1]
    scored = targets >= 0
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none").view(B, -1)
    mean_nats = nats.sum(1) / scored.sum(1)
    wrong = (logits.argmax(-1) != targets) & scored
    return mean_nats.float().cpu(), ~wrong.any(1).cpu()


def is_correct(task_type, mean_nats, exact, gold):
    """multiple_choice / schema: the row with the lowest mean continuation loss is gold (ties go to
    the lower index); language_modeling: the single row is reproduced exactly by greedy decoding."""
    if task_type == "language_modeling":
        return bool(exact[0])
    return int(torch.argmin(mean_nats)) == gold


def centered_accuracy(accuracy, baseline):
    """(accuracy - baseline) / (1 - baseline): 0 at random guessing, 1 at perfect (DCLM)."""
    return (accuracy - baseline) / (1.0 - baseline)


def select_items(num_items, max_per_task, rank=0, world_size=1):
    """Indices this rank evaluates: all items, or a fixed pseudo-random subset of max_per_task of
    them (the same on every rank and every call), striped over ranks."""
    order = list(range(num_items))
    if 0 < max_per_task < num_items:
        random.Random(SUBSET_SEED).shuffle(order)
        order = sorted(order[:max_per_task])
    return order[rank::world_size]


PROGRESS_EVERY_S = 30.0  # seconds between progress lines within a task (full tasks run for minutes)


def evaluate_task(model, tokenizer, device, task, items, max_per_task=-1, seed=FEWSHOT_SEED, share_prefix=True, log=None):
    """Accuracy of one task. Distributed (process group initialised): items are striped over ranks
    and the counts all-reduced, every rank returns the global result. log: called with a progress
    line (this rank's items) every PROGRESS_EVERY_S seconds. Returns (correct, total)."""
    ddp = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    max_len = model.config.sequence_len
    correct = 0
    indices = select_items(len(items), max_per_task, rank, world_size)
    t0 = last = time.time()
    for i, index in enumerate(indices):
        if log and i and time.time() - last > PROGRESS_EVERY_S:
            last = time.time()
            eta = (last - t0) / i * (len(indices) - i)
            log(f"CORE {task.label}: {i}/{len(indices)} items, {correct / i:.4f} so far, eta {eta:.0f}s")
        prompt = render_prompt(task, items, index, seed)
        mean_nats, exact = score_rows(model, tokenize_prompt(tokenizer, prompt, max_len), device, pad_id=tokenizer.bos_token_id, share_prefix=share_prefix)
        correct += is_correct(task.task_type, mean_nats, exact, prompt.gold)
    counts = torch.tensor([correct, len(indices)], dtype=torch.long, device=device)
    if ddp:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0]), int(counts[1])


# ------------------------------------------------------------------------------------------------
# the metric


def evaluate_core(model, tokenizer, device, max_per_task=-1, eval_dir=None, baseline="v1", seed=FEWSHOT_SEED, log=None, share_prefix=True):
    """
    The CORE metric of a base model.

    model: a nanochat GPT in eval mode (or anything with its interface, see score_rows); prompts
    are cut to model.config.sequence_len. tokenizer: nanochat Tokenizer. max_per_task: items per
    task (-1: all; a fixed subset otherwise, for quick evaluations during training). eval_dir: see get_eval_dir.
    baseline: "v1" (published CORE numbers) or "v2" (DCLM's corrected baselines). log: a callable
    given progress lines (one per task, more within long tasks; e.g. print0), or None.
    share_prefix: run the prefix shared by an item's rows once through a KV cache (same result,
    faster; see score_rows). Every rank must call this when distributed; every rank gets the same
    result.

    Returns {"core": mean centred accuracy over the tasks present (float), "tasks_present": int,
    "tasks_total": int, "tasks_missing": [labels], "note": str (says when the average is partial),
    "baseline": str, "max_per_task": int, "eval_dir": str, "time_s": float,
    "results": {label: {"task_type", "num_fewshot", "accuracy", "centered", "random_baseline",
    "num_items", "time_s"}}}.
    Raises NanochatError for a bad eval dir / task table / data file, a bad argument, or when no
    task's data is present.
    """
    if baseline not in BASELINE_VERSIONS:
        raise NanochatError(f"unknown CORE baseline version {baseline!r}; expected one of {', '.join(BASELINE_VERSIONS)}")
    if max_per_task == 0 or max_per_task < -1:
        raise NanochatError(f"max_per_task {max_per_task}: expected -1 (all items) or >= 1")
    eval_dir = get_eval_dir(eval_dir)
    tasks = load_task_table(eval_dir)
    t_start = time.time()
    results, missing = {}, []
    for task in tasks:
        path = os.path.join(eval_dir, task.file)
        items = load_items(path, task.task_type) if os.path.isfile(path) else []
        if not items:
            missing.append(task.label)
            continue
        t0 = time.time()
        correct, total = evaluate_task(model, tokenizer, device, task, items, max_per_task, seed, share_prefix, log)
        accuracy = correct / total
        base = task.random_baseline(baseline)
        results[task.label] = {
            "task_type": task.task_type,
            "num_fewshot": task.num_fewshot,
            "accuracy": accuracy,
            "centered": centered_accuracy(accuracy, base),
            "random_baseline": base,
            "num_items": total,
            "time_s": time.time() - t0,
        }
        if log:
            r = results[task.label]
            log(f"CORE {task.label:<34s} acc {accuracy:.4f} | centered {r['centered']:+.4f} | {total} items | {r['time_s']:.1f}s")
    if not results:
        raise NanochatError(f"no CORE task data in {eval_dir}: all {len(tasks)} task files of {TASK_TABLE} are missing or empty")
    core = sum(r["centered"] for r in results.values()) / len(results)
    note = f"CORE over all {len(tasks)} tasks" if not missing else f"CORE averaged over the {len(results)} of {len(tasks)} tasks present; missing: {', '.join(missing)}"
    return {
        "core": core,
        "tasks_present": len(results),
        "tasks_total": len(tasks),
        "tasks_missing": missing,
        "note": note,
        "baseline": baseline,
        "max_per_task": max_per_task,
        "eval_dir": os.path.abspath(eval_dir),
        "time_s": time.time() - t_start,
        "results": results,
    }


def format_core_table(result):
    """A markdown table of an evaluate_core result: one row per task (missing tasks included), then CORE."""
    lines = [
        f"| task | type | shots | items | accuracy | centered | random baseline ({result['baseline']}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in result["results"].items():
        lines.append(f"| {label} | {r['task_type']} | {r['num_fewshot']} | {r['num_items']} | {r['accuracy']:.4f} | {r['centered']:.4f} | {r['random_baseline']:.3f} |")
    for label in result["tasks_missing"]:
        lines.append(f"| {label} | missing | | | | | |")
    lines.append(f"| **CORE** | | | | | **{result['core']:.4f}** | |")
    lines.append("")
    lines.append(result["note"] + (f" (at most {result['max_per_task']} items per task)" if result["max_per_task"] > 0 else ""))
    return "\n".join(lines)
