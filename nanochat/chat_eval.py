"""
Evaluation of chat models on task objects (the tasks/ interface: len, task[i] -> conversation,
eval_type, evaluate): the loops that scripts/chat_eval.py and chat_rl share. The suite of tasks and
their evaluation splits is tasks/recipe.py (CHAT_TASKS, load_chat_task); this module never imports it.

Categorical tasks (MMLU, ARC; each conversation carries its answer "letters"): the prompt is the
conversation up to <|assistant_start|> (Tokenizer.render_for_completion); the model's prediction
is the letter whose token has the largest logit at that last position, among the problem's letters
only, and task.evaluate(conversation, letter) judges it. Prompts are batched: sorted by length,
right-padded, and the logits gathered at each row's last real position (causal attention: the
padding after a row cannot change it).

Generative tasks (GSM8K, HumanEval, SpellingBee): num_samples completions per problem through the
Engine (KV cache, several problems decoded as one batch, python tool calls run in the sandbox of
nanochat/execution.py), each judged by the task's evaluate(). A sandboxed program that times out
or crashes is a failure that evaluate() reports; a judge that raises is a failed sample too,
counted in "eval_errors": one sample never stops the evaluation. Reported: pass@k with the
unbiased estimator of Chen et al. 2021, and accuracy = pass@1.

Difficulty buckets: a task may declare `buckets`, an ordered tuple of names (class or instance
attribute), and each of its conversations then carries "bucket", one of them (MultiHop: easy /
medium / hard by hops; GSM8K: solution steps; ARC: its set; MMLU: subject groups). Problems and
correct answers (generative: pass@1 = c / n per problem) are summed per bucket too; the result holds
each bucket's accuracy with its 95% interval, and bucket_table() prints them. The interval is the
Wilson score interval of a binomial proportion (Wilson 1927, "Probable inference, the law of
succession, and statistical inference"; nanochat.lab.wilson) on the bucket's n problems. With
several samples per problem the proportion is the mean of the per-problem pass@1 on n problems, an
approximation: each problem counts as one trial. It is exact in form when a problem's samples agree
(all right or all wrong) and otherwise conservative (too wide): per-problem means in [0, 1] vary less
than 0/1 outcomes with the same mean.
A task with score(conversation, completion) -> {"coverage": float, ...} (MultiHop: the share of the
gold reasoning hops found in the trace) also gets the mean coverage over samples, overall and per
bucket.

Paired comparison: evaluate_task keeps every problem's score (index, bucket, 0/1 or pass@1), and
paired_difference() compares two evaluations of one task on their common problems, per bucket, with
the interval of the mean per-problem difference: two checkpoints of one run mostly agree problem by
problem, so the paired interval is narrower than that of a difference of two independent accuracies
(0.56x on MultiHop's hard bucket, SFT against RSFT: +-0.039 against +-0.069).

ChatCORE (nanochat): the mean over tasks of the accuracy centred by its chance level,
(acc - chance) / (1 - chance); chance is the mean of 1 / (number of choices) over the problems
of a categorical task (ARC questions have 3 to 5 choices), 0 for a generative task.

Distributed (process group initialised): problems are striped over ranks, the sums all-reduced
(per-bucket sums included: every rank holds every declared bucket, so the keys agree); every rank
returns the global result. A problem's samples are seeded by its index, so results do
not depend on the number of ranks.
"""

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import NanochatError
from nanochat.lab import Z95, wilson

# Logits of one categorical batch are [B, T, vocab_size] fp32 (the model returns every position):
# B and the padded T are capped so that this stays under LOGITS_BUDGET_BYTES.
LOGITS_BUDGET_BYTES = 1 << 30


# -----------------------------------------------------------------------------
# Scores


def pass_at_k(n, c, k):
    """
    Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code", arXiv:2107.03374, eq. 1 and its numerically
    stable product form): 1 - C(n - c, k) / C(n, k). Returns a float in [0, 1].
    Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def report_ks(num_samples):
    """The k of pass@k reported for num_samples samples per problem: 1, 10, 100 up to n, and n."""
    return sorted({k for k in (1, 10, 100) if k <= num_samples} | {num_samples})


def centered(accuracy, chance):
    """(accuracy - chance) / (1 - chance): 0 at chance level, 1 when every answer is right."""
    return (accuracy - chance) / (1.0 - chance)


def chat_core(results):
    """ChatCORE: the mean centred score of results (a list of evaluate_task dicts); None if empty."""
    return float(np.mean([r["centered"] for r in results])) if results else None


# -----------------------------------------------------------------------------
# Helpers


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sums(sums, device):
    """Sum a dict of numbers, or of such dicts (the per-bucket sums), over ranks; every rank must hold
    the same keys. Returns the same structure with floats."""
    leaves = []

    def flatten(d, prefix):
        for k in sorted(d):  # sorted: the same order on every rank, whatever the insertion order
            if isinstance(d[k], dict):
                flatten(d[k], prefix + (k,))
            else:
                leaves.append((prefix + (k,), float(d[k])))

    flatten(sums, ())
    t = torch.tensor([v for _, v in leaves], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    reduced = dict(zip([path for path, _ in leaves], t.tolist()))

    def rebuild(d, prefix):
        return {k: rebuild(v, prefix + (k,)) if isinstance(v, dict) else reduced[prefix + (k,)] for k, v in d.items()}

    return rebuild(sums, ())


def _bucket_sums(task, fields):
    """Zeroed per-bucket sums {bucket: {field: 0}} in the task's declared bucket order ({} without buckets)."""
    return {name: dict.fromkeys(fields, 0) for name in getattr(task, "buckets", None) or ()}


def _bucket(buckets, conversation, i):
    """The sums of problem i's bucket, or None for a task without buckets. NanochatError for a
    conversation without a declared bucket."""
    if not buckets:
        return None
    name = conversation.get("bucket")
    if name not in buckets:
        raise NanochatError(f"problem {i} has bucket {name!r}, not one of the task's declared buckets {', '.join(buckets)}")
    return buckets[name]


def select_problems(num_problems, max_problems=-1, seed=42):
    """The problems to evaluate: all of them in order, or a fixed pseudo-random subset of
    max_problems (the same on every rank and run: test sets are often sorted by subject)."""
    if max_problems < 0 or max_problems >= num_problems:
        return list(range(num_problems))
    return sorted(np.random.default_rng(seed).permutation(num_problems)[:max_problems].tolist())


def letter_token_ids(tokenizer, letters):
    """The token id of each answer letter. Raises NanochatError if a letter is not a single token."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise NanochatError(f"the tokenizer encodes the answer letter {letter!r} as {len(tokens)} tokens; categorical evaluation needs one token per letter")
        ids.append(tokens[0])
    return ids


def fit_prompt(ids, limit):
    """Keep the last `limit` tokens of a prompt (only prompts longer than the model can run are cut:
    the question's tail, its choices and the instruction matter most). Returns (ids, was_cut)."""
    return (ids, False) if len(ids) <= limit else (ids[-limit:], True)


# -----------------------------------------------------------------------------
# The two loops (this rank's problems; no communication)


@torch.no_grad()
def evaluate_categorical(model, tokenizer, task, indices, batch_size=8, logits_budget_bytes=LOGITS_BUDGET_BYTES, log=None):
    """
    Score categorical problems task[i] for i in indices. model(idx) -> fp32 logits [B, T, vocab_size].
    The predicted letter is judged by task.evaluate(conversation, letter).
    log: called with a progress line now and then, or None.
    Returns (sums, outcomes): sums = {"problems", "correct", "chance", "cropped", "buckets"} (chance:
    the sum of 1 / number of letters; buckets: {bucket: {"problems", "correct"}} in the task's
    declared order, {} without buckets), outcomes = {index: (predicted letter, [logit of each letter],
    fp32 values), correct (bool))}.
    """
    device = model.lm_head.weight.device
    limit = getattr(model, "rotary_seq_len", None) or model.config.sequence_len
    vocab_size = model.config.vocab_size
    items, cropped, chance, buckets = [], 0, 0.0, _bucket_sums(task, ("problems", "correct"))
    for i in indices:
        conversation = task[i]
        _bucket(buckets, conversation, i)  # checked before any forward pass
        letters = conversation["letters"]
        ids, cut = fit_prompt(tokenizer.render_for_completion(conversation), limit)
        cropped += cut
        chance += 1.0 / len(letters)
        items.append((i, ids, conversation, letter_token_ids(tokenizer, letters)))
    items.sort(key=lambda item: -len(item[1]))  # similar lengths together: little padding
    outcomes, correct, start, reported, t0 = {}, 0, 0, 0, time.time()
    while start < len(items):
        T = len(items[start][1])  # the longest of the batch (sorted)
        B = max(1, min(batch_size, logits_budget_bytes // (T * vocab_size * 4)))
        batch = items[start : start + B]
        start += len(batch)
        x = torch.full((len(batch), T), tokenizer.bos_token_id, dtype=torch.long)
        for row, (_, ids, _, _) in enumerate(batch):
            x[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = model(x.to(device))
        last = torch.tensor([len(ids) - 1 for _, ids, _, _ in batch], device=device)
        final = logits[torch.arange(len(batch), device=device), last]  # [B, vocab_size]
        for row, (i, _, conversation, letter_ids) in enumerate(batch):
            letter_logits = final[row, letter_ids]
            predicted = conversation["letters"][int(letter_logits.argmax())]
            ok = bool(task.evaluate(conversation, predicted))
            outcomes[i] = (predicted, letter_logits.tolist(), ok)
            correct += ok
            if (bucket := _bucket(buckets, conversation, i)) is not None:
                bucket["problems"] += 1
                bucket["correct"] += ok
        if log is not None and (start - reported >= max(1, len(items) // 10) or start == len(items)):
            reported = start
            log(f"  {start}/{len(items)} problems scored ({time.time() - t0:.0f}s)")
    return {"problems": len(items), "correct": correct, "chance": chance, "cropped": cropped, "buckets": buckets}, outcomes


def _has_score(task):
    """Whether the task reports a coverage: a score(conversation, completion) -> {"coverage", ...} method."""
    return callable(getattr(task, "score", None))


def _judge(task, conversation, completion):
    """(correct, coverage or None, error message or None): a judge that raises is a failed sample,
    not a crash, and has no coverage; so does a sample whose score() has no "coverage"."""
    try:
        correct = bool(task.evaluate(conversation, completion))
        coverage = task.score(conversation, completion).get("coverage") if _has_score(task) else None
        return correct, None if coverage is None else float(coverage), None
    except Exception as e:  # noqa: BLE001 - any failure of one sample's check is that sample failing
        return False, None, f"{type(e).__name__}: {e}"


def evaluate_generative(engine, tokenizer, task, indices, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=None, seed=42, batch_size=8, workers=4, log=None):
    """
    Sample num_samples completions for each problem task[i], i in indices, with engine (a
    nanochat.engine.Engine), and judge them with task.evaluate() on a thread pool (HumanEval runs
    each in a sandboxed subprocess) while the next problems are generated.
    batch_size problems are decoded together (Engine.generate_many: batch_size x num_samples rows);
    problem i is sampled with its own seed + i, so its samples do not depend on the batching.
    log: called with a progress line now and then, or None.
    Returns (sums, outcomes): sums = {"problems", "samples", "correct_samples", "eval_errors",
    "cropped", "pass@k" for k in report_ks(num_samples), "buckets"} (pass@k summed over problems;
    buckets: {bucket: {"problems", "pass@1"}} in the task's declared order, {} without buckets), and
    for a task with score(): "coverage" (summed over the samples that have one) and
    "coverage_samples" (their number), per bucket too; outcomes = {index: list of (completion, correct)}.
    """
    from nanochat.engine import GenerationRequest

    model = engine.model
    limit = getattr(model, "rotary_seq_len", model.config.sequence_len) - max_new_tokens
    if limit < 1:
        raise NanochatError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's {limit + max_new_tokens} positions")
    ks = report_ks(num_samples)
    coverage_fields = ("coverage", "coverage_samples") if _has_score(task) else ()
    buckets = _bucket_sums(task, ("problems", "pass@1") + coverage_fields)
    pending, cropped, first_error = [], 0, None
    t0, reported = time.time(), 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chat-eval-judge") as pool:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            conversations, requests = [task[i] for i in chunk], []
            for i, conversation in zip(chunk, conversations):
                _bucket(buckets, conversation, i)  # checked before generating
                ids, cut = fit_prompt(tokenizer.render_for_completion(conversation), limit)
                cropped += cut
                requests.append(GenerationRequest(ids, num_samples=num_samples, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i))
            samples = [[[] for _ in range(num_samples)] for _ in chunk]
            for events in engine.generate_many(requests):
                for e in events:
                    if e.finish != "stop":  # the stop token itself is not part of the completion
                        samples[e.key][e.sample].append(e.token)
            for i, conversation, tokens in zip(chunk, conversations, samples):
                completions = [tokenizer.decode(t) for t in tokens]
                pending.append((i, conversation, completions, [pool.submit(_judge, task, conversation, c) for c in completions]))
            done = start + len(chunk)
            if log is not None and (done - reported >= max(1, len(indices) // 10) or done == len(indices)):
                reported = done
                log(f"  {done}/{len(indices)} problems generated ({time.time() - t0:.0f}s)")
        sums = {"problems": len(indices), "samples": len(indices) * num_samples, "correct_samples": 0, "eval_errors": 0, "cropped": cropped} | {f"pass@{k}": 0.0 for k in ks}
        sums |= dict.fromkeys(coverage_fields, 0.0) | {"buckets": buckets}
        outcomes = {}
        for i, conversation, completions, futures in pending:
            judged = [f.result() for f in futures]
            c = sum(ok for ok, _, _ in judged)
            errors = [err for _, _, err in judged if err is not None]
            coverages = [coverage for _, coverage, _ in judged if coverage is not None]
            sums["correct_samples"] += c
            sums["eval_errors"] += len(errors)
            first_error = first_error or (errors[0] if errors else None)
            for k in ks:
                sums[f"pass@{k}"] += pass_at_k(num_samples, c, k)
            if coverage_fields:
                sums["coverage"] += sum(coverages)
                sums["coverage_samples"] += len(coverages)
            if (bucket := _bucket(buckets, conversation, i)) is not None:
                bucket["problems"] += 1
                bucket["pass@1"] += c / num_samples  # pass_at_k(num_samples, c, 1)
                if coverage_fields:
                    bucket["coverage"] += sum(coverages)
                    bucket["coverage_samples"] += len(coverages)
            outcomes[i] = [(completion, ok) for completion, (ok, _, _) in zip(completions, judged)]
    if first_error and log is not None:
        log(f"  {sums['eval_errors']} sample(s) failed in the judge, e.g. {first_error}")
    return sums, outcomes


# -----------------------------------------------------------------------------
# One task, all ranks


def _mean_coverage(sums):
    """Mean coverage of summed sums: None without coverage sums or samples."""
    return sums["coverage"] / sums["coverage_samples"] if sums.get("coverage_samples") else None


def _bucket_result(b, correct_key):
    """One bucket's entry of evaluate_task's "buckets" from its summed sums (correct_key: the sum of
    per-problem scores, "correct" or "pass@1")."""
    n = int(b["problems"])
    accuracy = b[correct_key] / n if n else None
    entry = {"problems": n, "accuracy": accuracy, "ci95": list(wilson(accuracy, n)) if n else None}
    if "coverage_samples" in b:
        entry["coverage"] = _mean_coverage(b)
    return entry


def evaluate_task(model, tokenizer, name, task, max_problems=-1, batch_size=8, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=None, seed=42, log=None):
    """
    Evaluate one task (categorical or generative, from task.eval_type) on all ranks; every rank
    must call this. Returns a dict: task, eval_type, problems, accuracy, ci95 ([lo, hi], the Wilson
    95% interval of the accuracy on the problems), chance, centered, cropped (prompts cut to fit the
    model), and for generative tasks num_samples, pass@k ({k: value}), eval_errors; for a task with
    score(): coverage (mean over the samples); for a task with buckets: buckets ({bucket: {"problems",
    "accuracy", "ci95", "coverage" with score()}} in the declared order; accuracy and ci95 None, and
    coverage None, for a bucket without problems or samples); per_problem ({"index", "score", and
    "bucket" for a task with buckets: parallel lists over all ranks' problems in index order; score is
    1.0 / 0.0 for a categorical problem, the problem's pass@1 (correct samples / samples) for a
    generative one), what paired_difference() compares; task_size (len(task)); time_s.
    Raises NanochatError for a task without an evaluation or with no problems, or a problem whose
    bucket the task does not declare.
    """
    from nanochat.engine import Engine

    rank, world_size = _dist_info()
    if task.eval_type not in ("categorical", "generative"):
        raise NanochatError(f"{name}: task {type(task).__name__} has no evaluation (eval_type {task.eval_type!r})")
    if num_samples > 1 and temperature == 0.0 and task.eval_type == "generative":
        raise NanochatError(f"{name}: --num-samples {num_samples} with --temperature 0 gives {num_samples} identical samples; set --temperature > 0")
    indices = select_problems(len(task), max_problems, seed)
    if not indices:
        raise NanochatError(f"{name}: no problems to evaluate")
    mine = indices[rank::world_size]
    device = model.lm_head.weight.device
    t0 = time.time()
    if task.eval_type == "categorical":
        sums, outcomes = evaluate_categorical(model, tokenizer, task, mine, batch_size=batch_size, log=log if rank == 0 else None)
        scores = {i: float(ok) for i, (_, _, ok) in outcomes.items()}
        sums = _all_reduce_sums(sums, device)
        problems = int(sums["problems"])
        accuracy, chance = sums["correct"] / problems, sums["chance"] / problems
        result = {"task": name, "eval_type": "categorical", "problems": problems, "accuracy": accuracy, "chance": chance}
        correct_key = "correct"
    else:
        engine = Engine(model, tokenizer)
        sums, outcomes = evaluate_generative(engine, tokenizer, task, mine, num_samples, max_new_tokens, temperature, top_k, seed, batch_size, log=log if rank == 0 else None)
        scores = {i: sum(ok for _, ok in samples) / len(samples) for i, samples in outcomes.items()}
        sums = _all_reduce_sums(sums, device)
        problems = int(sums["problems"])
        pass_k = {k: sums[f"pass@{k}"] / problems for k in report_ks(num_samples)}
        result = {"task": name, "eval_type": "generative", "problems": problems, "accuracy": pass_k[1], "chance": 0.0, "num_samples": num_samples, "pass_at_k": pass_k, "eval_errors": int(sums["eval_errors"])}
        correct_key = "pass@1"
    result["ci95"] = list(wilson(result["accuracy"], problems))
    if _mean_coverage(sums) is not None:
        result["coverage"] = _mean_coverage(sums)
    if getattr(task, "buckets", None):
        result["buckets"] = {bucket: _bucket_result(b, correct_key) for bucket, b in sums["buckets"].items()}
    result["centered"] = centered(result["accuracy"], result["chance"])
    result["cropped"] = int(sums["cropped"])
    result["per_problem"] = _per_problem(task, scores)
    result["task_size"] = len(task)
    result["time_s"] = time.time() - t0
    return result


def _per_problem(task, scores):
    """evaluate_task's "per_problem" from this rank's {index: score}, gathered from every rank."""
    items = sorted(scores.items())
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        items = sorted(item for part in parts for item in part)
    out = {"index": [i for i, _ in items], "score": [score for _, score in items]}
    if getattr(task, "buckets", None):
        out["bucket"] = [task[i]["bucket"] for i, _ in items]
    return out


# -----------------------------------------------------------------------------
# Presentation


def format_table(results, chatcore, suite):
    """A markdown table of evaluate_task results (one row per task) and, unless chatcore is None, the
    ChatCORE line, then the per-bucket table (bucket_table) when a result has buckets. suite: the task
    names a full ChatCORE averages over (tasks.recipe.CHAT_TASKS); the line says when the results
    cover only some of them (results outside the suite, e.g. MultiHop, do not count)."""
    lines = ["| task | type | problems | accuracy | chance | centred | pass@k | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        pass_k = ", ".join(f"pass@{k} {v:.4f}" for k, v in r.get("pass_at_k", {}).items() if k != 1) or "-"
        lines.append(f"| {r['task']} | {r['eval_type']} | {r['problems']} | {r['accuracy']:.4f} | {r['chance']:.4f} | {r['centered']:+.4f} | {pass_k} | {r['time_s']:.1f} |")
    if chatcore is not None:
        names = {r["task"] for r in results} & set(suite)
        scope = f"all {len(suite)} tasks" if names == set(suite) else \
            f"{len(names)} of the {len(suite)} tasks: not comparable to a full ChatCORE"
        lines.append(f"\nChatCORE {chatcore:.4f} (mean centred score over {scope})")
    buckets = bucket_table(results)
    return "\n".join(lines + (["", buckets] if buckets else []))


def bucket_table(results):
    """
    A markdown table of the difficulty buckets of evaluate_task results, the one every stage that
    evaluates prints (chat_eval through format_table; RSFT, GRPO): per task with buckets or a coverage, one row per bucket in the task's order and
    an "all" row, with n (problems), accuracy, its Wilson 95% interval and, when some task has one,
    the mean coverage. "" when no result has buckets or a coverage.
    """
    shown = [r for r in results if r.get("buckets") or "coverage" in r]
    if not shown:
        return ""
    with_coverage = any("coverage" in r for r in shown)

    def number(x):
        return "-" if x is None else f"{x:.4f}"

    columns = ["task", "bucket", "n", "accuracy", "95% interval"] + (["coverage"] if with_coverage else [])
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in shown:
        overall = {"problems": r["problems"], "accuracy": r["accuracy"], "ci95": r.get("ci95"), "coverage": r.get("coverage")}
        for bucket, b in list(r.get("buckets", {}).items()) + [("all", overall)]:
            interval = "-" if b["ci95"] is None else f"[{b['ci95'][0]:.4f}, {b['ci95'][1]:.4f}]"
            cells = [r["task"], bucket, str(b["problems"]), number(b["accuracy"]), interval]
            lines.append("| " + " | ".join(cells + ([number(b.get("coverage"))] if with_coverage else [])) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Paired comparison of two evaluations


def paired_difference(before, after):
    """
    Compare two evaluate_task results of one task on the problems both evaluated (matched by index):
    per bucket in the task's order, then "all", the mean of the per-problem score differences (after
    minus before) with its 95% interval. Pairing removes the spread between problems, which dominates
    the unpaired (Wilson) intervals of two accuracies, so a gain of a few points on a few hundred
    problems can be told from noise. The interval is the normal one, mean +- 1.96 s / sqrt(n), s the
    sample standard deviation of the n differences (Miller 2024, "Adding Error Bars to Evals",
    arXiv:2411.00640, its analysis of paired differences); None for n < 2.
    Returns a list of {"bucket", "problems", "before", "after", "diff", "ci95" ([lo, hi] or None),
    "fixed" (problems whose score rose), "broke" (problems whose score fell)}; a bucket with no
    common problem is left out.
    Raises NanochatError when a result has no per-problem scores, the two tasks differ in size (their
    indices name different problems), or no problem was evaluated by both.
    """
    for name, r in (("before", before), ("after", after)):
        if "per_problem" not in r:
            raise NanochatError(f"paired comparison of {r.get('task')}: the {name} evaluation has no per-problem scores (evaluated before they were kept; evaluate it again)")
    if before["task"] != after["task"] or before.get("task_size") != after.get("task_size"):
        raise NanochatError(f"paired comparison: {before['task']} ({before.get('task_size')} problems) and {after['task']} ({after.get('task_size')} problems) are not the same problems")
    a = dict(zip(before["per_problem"]["index"], before["per_problem"]["score"]))
    b = dict(zip(after["per_problem"]["index"], after["per_problem"]["score"]))
    buckets = dict(zip(after["per_problem"]["index"], after["per_problem"].get("bucket") or [None] * len(b)))
    common = sorted(a.keys() & b.keys())
    if not common:
        raise NanochatError(f"paired comparison of {after['task']}: no problem was evaluated by both (--max-problems and --seed choose them)")
    groups = {name: [i for i in common if buckets[i] == name] for name in after.get("buckets", {})}
    rows = []
    for name, idx in list(groups.items()) + [("all", common)]:
        if not idx:
            continue
        d = np.array([b[i] - a[i] for i in idx], dtype=np.float64)
        n, mean = len(d), float(d.mean())
        half = Z95 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else None
        rows.append({"bucket": name, "problems": n, "before": float(np.mean([a[i] for i in idx])), "after": float(np.mean([b[i] for i in idx])),
                     "diff": mean, "ci95": None if half is None else [mean - half, mean + half], "fixed": int((d > 0).sum()), "broke": int((d < 0).sum())})
    return rows


def paired_table(name_before, name_after, task, rows):
    """A markdown table of paired_difference rows: task, bucket, n, both accuracies, the difference
    with its 95% interval, and the problems fixed / broken."""
    lines = [f"| task | bucket | n | {name_before} | {name_after} | difference | 95% interval | fixed / broke |", "|---" * 8 + "|"]
    for r in rows:
        interval = "-" if r["ci95"] is None else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
        lines.append(f"| {task} | {r['bucket']} | {r['problems']} | {r['before']:.4f} | {r['after']:.4f} | {r['diff']:+.4f} | {interval} | {r['fixed']} / {r['broke']} |")
    return "\n".join(lines)
