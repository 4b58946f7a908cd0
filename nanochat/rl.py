"""
Reinforcement learning from verifiable rewards for the chat model: sampling groups of completions
through the engine, group-normalised advantages, the token-level policy-gradient loss
(scripts/chat_rl.py, stage rl), rejection-sampling fine-tuning (RSFT) selection
(scripts/chat_rsft.py, stage rsft), and what the two stages share: their flags, the prompt pool
(a task's split or a prompts file, filtered by difficulty bucket), the prompts of a step, scoring
with the task's verifier, the step metrics and the evaluation. Tasks come in as objects (the
scripts build them from tasks/recipe.py); this module never imports tasks/.

GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models", arXiv:2402.03300, section 4.1): for each prompt sample a group of K completions,
score each with a reward, and use the reward standardised within its group as the advantage of
every token of that completion; no value network. We follow the token-level variant: the loss is a
sum over every sampled token of the batch divided by the batch's token count (Yu et al. 2025,
"DAPO", arXiv:2503.14476, section 3.3), so long and short completions weigh per token, not per
sequence. The PPO clipped ratio (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
arXiv:1707.06347, eq. 7) only matters when a batch is reused for several updates; the optional KL
penalty to a frozen reference model uses the k3 estimator of the GRPO paper (eq. 4).

RSFT / rejection-sampling fine-tuning (Yuan et al. 2023, "Scaling Relationship on Learning
Mathematical Reasoning with Large Language Models", arXiv:2308.01825; expert iteration, Anthony et
al. 2017): sample K completions, keep the correct ones, fine-tune on them with the ordinary
cross-entropy loss.

Tokens forced into a completion by the python tool (<|output_start|> ... <|output_end|>) were not
sampled by the policy: they carry mask 0 and are never trained on, in either algorithm.
"""

import hashlib
import inspect
import json
import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.chat_eval import bucket_table, evaluate_task, pass_at_k, select_problems
from nanochat.common import NanochatError, print0
from nanochat.distribution import distribution_report
from nanochat.engine import GenerationRequest
from nanochat.lab import Z95
from nanochat.registry import read_jsonl


@dataclass
class Rollout:
    """
    One sampled completion of one prompt.
    prompt: prompt token ids (ends with <|assistant_start|>). tokens: the completion's ids in the
    order generated, including the stop token when finish == "stop". mask: one int per token, 1 =
    sampled by the policy, 0 = forced by the engine (tool output). finish: "stop" | "length".
    text: the completion decoded without its stop token (what the task judges). reward: float.
    correct: what the task's evaluate() said. coverage: the share of the reasoning the task's
    score() found (MultiHop: gold hops in the trace), None for a task without score().
    """

    prompt: list
    tokens: list
    mask: list
    finish: str
    text: str = ""
    reward: float = 0.0
    correct: bool = False
    coverage: float | None = None


def sample_rollouts(engine, prompts, num_samples, max_new_tokens, temperature=1.0, top_k=None, seeds=None, tools=True):
    """
    Sample num_samples completions of each prompt (a list of token-id lists) in one decode batch
    (the engine's continuous batching: rows leave as they finish). seeds: one int per prompt (the
    request's own generator, so a prompt's samples do not depend on the rest of the batch);
    default 0, 1, 2, ... Returns a list (one per prompt) of lists of num_samples Rollout, with
    text decoded and reward/correct left for the caller.
    """
    tokenizer = engine.tokenizer
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    requests = [
        GenerationRequest(list(p), num_samples=num_samples, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=s, tools=tools)
        for p, s in zip(prompts, seeds)
    ]
    groups = [[Rollout(list(p), [], [], "length") for _ in range(num_samples)] for p in prompts]
    for events in engine.generate_many(requests):
        for e in events:
            r = groups[e.key][e.sample]
            r.tokens.append(e.token)
            r.mask.append(e.mask)
            if e.finish is not None:
                r.finish = e.finish
    for group in groups:
        for r in group:
            r.text = tokenizer.decode(r.tokens[:-1] if r.finish == "stop" else r.tokens)
    return groups


def group_advantages(rewards, normalize_std=True, eps=1e-4):
    """
    GRPO advantages. rewards: float tensor [G, K], K completions of each of G prompts. Returns fp32
    [G, K]: (r - mean of its group) / (std of its group + eps) with the population std (a group
    whose rewards are all equal gets 0: nothing to learn from it), or only r - mean when
    normalize_std is False (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783,
    argue the std division over-weights nearly solved and nearly hopeless prompts).
    eps keeps a group with tiny spread from exploding. Raises ValueError unless rewards is 2-D.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_prompts, num_samples], got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def collate_rollouts(rollouts, pad_id, device=None):
    """
    Training rows for rollouts: the prompt then the completion, shifted for next-token prediction.
    Returns inputs, targets int64 [B, T] (T = longest prompt + completion - 1); targets are -1
    where nothing is trained: the prompt, tool-forced tokens (mask 0), and the right padding.
    """
    T = max(len(r.prompt) + len(r.tokens) for r in rollouts) - 1
    inputs = torch.full((len(rollouts), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rollouts), T), -1, dtype=torch.long)
    for i, r in enumerate(rollouts):
        ids = torch.tensor(r.prompt + r.tokens, dtype=torch.long)
        trained = torch.tensor([0] * len(r.prompt) + list(r.mask), dtype=torch.bool)
        n = len(ids) - 1
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = torch.where(trained[1:], ids[1:], -1)
    return inputs.to(device), targets.to(device)


def token_logprobs(model, inputs, targets, temperature=1.0):
    """
    log pi_T(target | prefix) per position: fp32 [B, T], 0 where targets is -1, where pi_T =
    softmax(softcapped logits / temperature) is the distribution the engine samples from at that
    temperature (before top-k). At temperature 1 it is the model's own cross-entropy, the exact
    log-probability it trains; at another temperature it is the policy whose samples the batch
    holds, so the policy gradient is on-policy (as in verl, which divides the logits by the rollout
    temperature). Raises ValueError for temperature <= 0.
    """
    if temperature <= 0:
        raise ValueError(f"token_logprobs needs a temperature > 0, got {temperature}")
    if temperature == 1.0:
        return -model(inputs, targets, loss_reduction="none")
    logits = model(inputs) / temperature  # fp32 [B, T, V], softcapped
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none").view(targets.shape)


def policy_gradient_loss(logprobs, advantages, mask, num_tokens, old_logprobs=None, clip_eps=0.0, ref_logprobs=None, kl_coef=0.0):
    """
    The token-level policy-gradient loss of a micro-batch.

    logprobs: fp32 [B, T], log-probs of the sampled tokens under the model being trained (with
    grad). advantages: fp32 [B], one per completion (broadcast over its tokens). mask: bool or 0/1
    [B, T], the sampled tokens (targets >= 0). num_tokens: the normaliser, the number of sampled
    tokens in the WHOLE batch (all micro-batches, all ranks), so that the micro-batch losses sum to
    the batch mean. old_logprobs: fp32 [B, T] under the policy that sampled (None: on-policy, the
    ratio is exactly 1 and the gradient is advantage * grad log pi). clip_eps > 0: PPO's clipped
    objective min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A). ref_logprobs with kl_coef > 0:
    add kl_coef * KL(pi || pi_ref) per token, estimated by k3 = exp(ref - logp) - (ref - logp) - 1
    (unbiased, never negative).

    Returns (loss, stats): loss a 0-D fp32 tensor to backward; stats 0-D detached tensors summed
    over this micro-batch's sampled tokens, to be added up over micro-batches and ranks and divided
    by num_tokens: "clipped" (tokens with |ratio - 1| > clip_eps) and "kl" (k3, 0 without a
    reference).
    """
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)
    adv = advantages.to(logprobs.dtype)[:, None]
    surrogate = ratio * adv
    clipped = torch.zeros((), device=logprobs.device)
    if clip_eps > 0:
        surrogate = torch.minimum(surrogate, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
        clipped = (((ratio.detach() - 1.0).abs() > clip_eps).to(mask.dtype) * mask).sum()
    per_token = -surrogate
    kl = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None and kl_coef > 0:
        delta = ref_logprobs - logprobs
        k3 = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * k3
        kl = (k3.detach() * mask).sum()
    loss = (per_token * mask).sum() / num_tokens
    return loss, {"clipped": clipped, "kl": kl}


def select_correct(groups, max_per_question=None, min_coverage=0.0, max_pass_rate=1.0, distinct=False):
    """
    RSFT selection. groups: a list (one per question) of lists of Rollout with `correct` set.
    Returns [(question index, sample index)] of exactly the correct rollouts whose coverage (when
    the task scores one) is at least min_coverage, in order, at most max_per_question of each
    question (None: all of them). min_coverage > 0 keeps a right answer reached without its
    reasoning out of the training set: trained on, such samples teach the model to skip the trace.
    A question whose share of such samples is above max_pass_rate is skipped whole: the model
    already solves it, and its copies would crowd the questions it is learning out of the step
    (the filter of DAPO's dynamic sampling, Yu et al. 2025, arXiv:2503.14476, kept for the winners' side).
    distinct: keep one of each set of identical completions of a question (same tokens), as RFT
    keeps distinct reasoning paths (Yuan et al. 2023): at a low temperature most of a question's
    winners are copies, and copies only reweight the step toward the questions already solved.
    """
    kept = []
    for q, group in enumerate(groups):
        picks = [s for s, r in enumerate(group) if r.correct and (r.coverage is None or r.coverage >= min_coverage)]
        if len(picks) > max_pass_rate * len(group):
            continue
        if distinct:
            firsts = {}
            for s in picks:
                firsts.setdefault(tuple(group[s].tokens), s)
            picks = sorted(firsts.values())
        kept += [(q, s) for s in picks[:max_per_question]]
    return kept


def rollout_to_conversation(tokenizer, conversation, rollout):
    """
    The conversation `conversation` (its last assistant message replaced) with the rollout as the
    assistant's reply, in the task format (tasks/common.py): text, python (tool call) and
    python_output parts, so a file of kept samples can be trained on again with CustomJSON.
    The stop token is dropped; a tool call cut off by the length limit ends as a text part.
    """
    S = tokenizer.special_tokens
    opens = {S["<|python_start|>"]: "python", S["<|output_start|>"]: "python_output"}
    closes = {S["<|python_end|>"]: "python", S["<|output_end|>"]: "python_output"}
    tokens = rollout.tokens[:-1] if rollout.finish == "stop" else rollout.tokens
    parts, buf, kind = [], [], "text"
    for t in tokens:
        if kind == "text" and t in opens:
            if buf:
                parts.append({"type": "text", "text": tokenizer.decode(buf)})
            buf, kind = [], opens[t]
        elif kind != "text" and closes.get(t) == kind:
            parts.append({"type": kind, "text": tokenizer.decode(buf)})
            buf, kind = [], "text"
        else:
            buf.append(t)
    if buf:
        parts.append({"type": "text", "text": tokenizer.decode(buf)})
    messages = list(conversation["messages"])
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"messages": messages + [{"role": "assistant", "content": parts}]}


def completion_tokens(groups):
    """Tokens generated (sampled and tool-forced) over all rollouts of groups."""
    return sum(len(r.tokens) for group in groups for r in group)



# ------------------------------------------------------------------------------------------------
# What the RL stages share (scripts/chat_rl.py: GRPO; scripts/chat_rsft.py: RSFT)


def add_rl_args(p, sources):
    """
    The flags of the RL stages, one name and one meaning in both: the starting checkpoint
    (--source, one of sources), the prompts (--task, --split, --buckets), sampling and the
    evaluation. Returns the argument group, for the stage's own flags.
    """
    g = p.add_argument_group("prompts, sampling and evaluation")
    g.add_argument("--source", type=str, default="sft", choices=sources, help="stage of the starting checkpoint")
    g.add_argument("--task", type=str, default="GSM8K", help="verifiable task (tasks/recipe.py TASKS with a generative evaluation: GSM8K, MultiHop, ...): the prompts and the verifier")
    g.add_argument("--split", type=str, default="train", help="split of --task the prompts come from")
    g.add_argument("--buckets", type=str, default=None, help="keep only prompts of these difficulty buckets, comma-separated (conversation['bucket']: MultiHop easy,medium,hard; GSM8K 1-3,4-5,6+; default: all)")
    g.add_argument("--tasks-dir", type=str, default=None, help="local task data (default: $NANOCHAT_TASKS_DIR, $NANOCHAT_DATA_ROOT/tasks or <base_dir>/tasks)")
    g.add_argument("--max-prompts", type=int, default=-1, help="train on a seeded subset of this many prompts (after --buckets), revisited every max-prompts / questions-per-step steps (-1: all)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the prompts when --num-iterations is not given")
    g.add_argument("--questions-per-step", type=int, default=16, help="prompts per step, all ranks (a multiple of the number of ranks)")
    g.add_argument("--num-samples", type=int, default=16, help="completions sampled per prompt (K, the group size)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per completion at most (tool output included)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of training rollouts and of the evaluation")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--sampling-batch-size", type=int, default=0, help="prompts decoded together per rank (0: all of the rank's prompts of the step)")
    g.add_argument("--eval-task", type=str, default=None, help="task of the evaluation and of the distribution report (default: --task)")
    g.add_argument("--eval-split", type=str, default="test", help="split of --eval-task evaluated")
    g.add_argument("--eval-problems", type=int, default=400, help="problems per evaluation, a fixed seeded subset (-1: all)")
    g.add_argument("--eval-samples", type=int, default=8, help="completions per problem: pass@1 .. pass@k up to this k")
    return g


def check_rl_args(args, min_samples=1, checks=()):
    """
    Range checks of add_rl_args's flags, then the stage's own checks ((flag, ok) pairs): the first
    failure raises NanochatError naming the flag and its value. Parses --buckets into a list of
    names (None: all). min_samples: the smallest group (GRPO: 2, an advantage needs a spread).
    """
    if args.buckets is not None:
        args.buckets = [b.strip() for b in args.buckets.split(",") if b.strip()] or None
        if args.buckets is None:
            raise NanochatError("--buckets names no bucket")
    checks = [
        ("--questions-per-step", args.questions_per_step >= 1), ("--num-samples", args.num_samples >= min_samples),
        ("--max-new-tokens", args.max_new_tokens >= 1), ("--temperature", args.temperature > 0), ("--top-k", args.top_k >= 0),
        ("--sampling-batch-size", args.sampling_batch_size >= 0), ("--eval-problems", args.eval_problems == -1 or args.eval_problems >= 1),
        ("--eval-samples", args.eval_samples >= 1), ("--max-prompts", args.max_prompts == -1 or args.max_prompts >= 1), ("--num-epochs", args.num_epochs > 0), ("--device-batch-size", args.device_batch_size != "auto"),
    ] + list(checks)
    for flag, ok in checks:
        if not ok:
            hint = f" (a group needs >= {min_samples} samples)" if flag == "--num-samples" and min_samples > 1 else ""
            raise NanochatError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range{hint}")
    return args


def check_rl_run(run, args, keys):
    """The checks of an RL run once RunState has started: --questions-per-step a multiple of the
    ranks, and on --resume the checkpoint's values of the flags `keys` (dests: they define the
    samples of every step) equal to this run's. A key the checkpoint's args lack (a run from before
    the flag existed) is not checked. Raises NanochatError naming the flag."""
    if args.questions_per_step % run.world_size:
        raise NanochatError(f"--questions-per-step {args.questions_per_step} is not a multiple of the {run.world_size} ranks")
    for key in keys if run.resuming else ():
        before = run.meta["args"].get(key, getattr(args, key))
        if before != getattr(args, key):
            raise NanochatError(f"--resume: the checkpoint in {run.ckpt_dir} was trained with --{key.replace('_', '-')} {before}, not {getattr(args, key)}")


def check_task_names(registry, args):
    """--task and --eval-task (when given) name verifiable tasks of registry: checked when the flags
    are parsed, before a run state touches a checkpoint directory. Raises NanochatError naming the flag."""
    for flag, name in (("--task", args.task), ("--eval-task", args.eval_task)):
        if name is not None:
            _check_verifiable(registry, name, flag)
    return args


def _check_verifiable(registry, name, flag):
    verifiable = sorted(n for n, cls in registry.items() if getattr(cls, "eval_type", None) == "generative")
    if name not in verifiable:
        raise NanochatError(f"{flag} {name}: not a verifiable task; expected one of {', '.join(verifiable)}")


def build_task(registry, name, split, tasks_dir=None, flag="--task"):
    """
    The task `name` of registry ({name: Task class}: tasks/recipe.py TASKS) on `split`, checked to
    be verifiable (eval_type "generative": evaluate() and reward() judge a completion). tasks_dir
    goes to the tasks that read data files. Raises NanochatError for an unknown or unverifiable
    name, a task without splits, or what the task raises (a bad split, missing data).
    """
    _check_verifiable(registry, name, flag)
    parameters = inspect.signature(registry[name]).parameters
    if "split" not in parameters:
        raise NanochatError(f"{flag} {name}: the task has no splits to train and evaluate on")
    return registry[name](split=split, **({"tasks_dir": tasks_dir} if "tasks_dir" in parameters else {}))


class PromptPool:
    """
    The prompts an RL stage samples from: source[i] for the positions i whose conversation's
    "bucket" is one of `buckets` (all of them when None). source: a sequence of conversations (a
    Task, or the list read from a prompts file). declared: the buckets the verifier's task declares
    (its `buckets`), which the names must be among. where: the source, for messages. max_prompts:
    keep a subset of that many of them (None or -1: all), drawn with `seed` and kept in source order.
    pool[j] is the conversation, pool.indices[j] its position in source.
    Raises NanochatError for --buckets with a name the task does not declare, and when no prompt is left.
    """

    def __init__(self, source, buckets=None, declared=(), where="the prompts", max_prompts=None, seed=0):
        if buckets is not None:
            unknown = [b for b in buckets if b not in (declared or ())]
            if unknown:
                raise NanochatError(f"--buckets {','.join(unknown)}: not a bucket of {where} (declared: {', '.join(declared) if declared else 'none'})")
        self.source, self.buckets = source, buckets
        self.indices = [i for i in range(len(source)) if buckets is None or source[i].get("bucket") in buckets]
        if not self.indices:
            raise NanochatError(f"no prompts in {where}" + (f" in the buckets {', '.join(buckets)}" if buckets else ""))
        if max_prompts not in (None, -1) and max_prompts < len(self.indices):
            keep = np.random.default_rng(seed).permutation(len(self.indices))[:max_prompts]
            self.indices = [self.indices[j] for j in sorted(keep.tolist())]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        return self.source[self.indices[j]]


def check_prompts(prompts, task, name, where):
    """
    Check prompts (conversations from a file) against the verifier `task` (named `name`): the
    verifier must judge each one's reference reply (its last assistant message) correct without
    error, which needs the metadata it reads (MultiHop: "answer", "path", "bucket", "hops"; GSM8K:
    the reference reply ending in "#### <answer>"). Raises NanochatError naming the prompt.
    """
    for i, conversation in enumerate(prompts, 1):
        content = conversation["messages"][-1]["content"]
        reference = content if isinstance(content, str) else "".join(part["text"] for part in content)
        try:
            ok = bool(task.evaluate(conversation, reference))
            task.reward(conversation, reference)
            if callable(getattr(task, "score", None)):
                task.score(conversation, reference)
        except Exception as e:  # noqa: BLE001 - any failure: the prompt lacks what the verifier reads
            raise NanochatError(f"{where}: prompt {i}: the {name} verifier cannot judge it ({type(e).__name__}: {e}); see docs/rl.md for the metadata a prompt needs") from None
        if not ok:
            raise NanochatError(f"{where}: prompt {i}: the {name} verifier does not accept its own reference reply (the last assistant message); see docs/rl.md")


def load_rl_data(registry, args, tokenizer, prompts=None):
    """
    The data of an RL stage from its flags (add_rl_args): the verifier task (--task on --split), the
    prompt pool (`prompts`, the conversations of --prompts checked with check_prompts, else the
    task; --buckets), the evaluation task (--eval-task on --eval-split), and the distribution report
    of the pool against the evaluation, printed. registry: {name: Task class} (tasks/recipe.py TASKS).
    Returns (task, pool, eval_task, shift): shift = {"bucket_tvd", "length_tvd"} for the run's report.
    """
    task = build_task(registry, args.task, args.split, args.tasks_dir)
    eval_task = build_task(registry, args.eval_task or args.task, args.eval_split, args.tasks_dir, flag="--eval-task")
    declared = getattr(task, "buckets", None) or ()
    if prompts is not None:
        check_prompts(prompts, task, args.task, args.prompts)
    where = f"{args.task} {args.split}" if prompts is None else args.prompts
    pool = PromptPool(task if prompts is None else prompts, args.buckets, declared, where, args.max_prompts, args.seed)
    print0(f"{len(pool):,} prompts of {where}" + (f" in the buckets {','.join(args.buckets)}" if args.buckets else "") + (" (--max-prompts)" if args.max_prompts != -1 else "")
           + f", judged by {args.task}'s verifier")
    return task, pool, eval_task, report_distribution(pool, eval_task, tokenizer, args, declared)


def prompt_schedule(run, args, pool):
    """The order the prompt pool is visited in (a seeded permutation of its indices; step_prompts
    walks it) and the number of steps: --num-iterations, else --num-epochs passes of
    --questions-per-step prompts. Prints the horizon and the passes over the pool. Returns (order, num_iterations)."""
    order = np.random.default_rng(args.seed).permutation(len(pool)).tolist()
    num_iterations = run.resolve("num_iterations") or max(1, int(args.num_epochs * len(pool) / args.questions_per_step))
    print0(f"{num_iterations} steps x {args.questions_per_step} prompts x {args.num_samples} samples on {run.world_size} rank(s): "
           f"{num_iterations * args.questions_per_step / len(pool):.2f} passes over the {len(pool):,} prompts")
    return order, num_iterations


def report_distribution(pool, eval_task, tokenizer, args, bucket_order=()):
    """Print the distribution report (nanochat/distribution.py) of the prompt pool against the
    problems the evaluation scores (--eval-problems of eval_task, the same seeded subset) before
    training. Returns {"bucket_tvd", "length_tvd"} for the run's report."""
    indices = select_problems(len(eval_task), args.eval_problems, args.seed)
    report = distribution_report(pool, [eval_task[i] for i in indices], tokenizer, bucket_order, names=("training", "evaluation"))
    print0(report["text"])
    return {"bucket_tvd": report["bucket_tvd"], "length_tvd": report["length_tvd"]}


def step_prompts(order, step, num_prompts, seed, rank=0, world_size=1):
    """
    This rank's prompts of a step: [(slot j, pool position, sampling seed)] for the step's slots
    j = rank, rank + world_size, ... < num_prompts; slot j of step s takes order[(s * num_prompts + j)
    % len(order)] (order: a seeded permutation of the pool). A fixed function of the step, so a
    resumed run needs no loader state; each prompt has its own seed, so its samples do not depend
    on the number of ranks or on the rest of the batch.
    """
    return [(j, order[(step * num_prompts + j) % len(order)], seed * 1_000_003 + step * num_prompts + j) for j in range(rank, num_prompts, world_size)]


def sample_groups(engine, conversations, seeds, num_samples, max_new_tokens, temperature=1.0, top_k=None, batch_size=0):
    """num_samples completions of each conversation's next assistant reply (the prompt:
    Tokenizer.render_for_completion), batch_size conversations decoded together (0: all), prompt i
    seeded with seeds[i]. Returns one group (list of Rollout) per conversation."""
    batch, groups = batch_size or len(conversations), []
    for b in range(0, len(conversations), batch):
        prompts = [engine.tokenizer.render_for_completion(c) for c in conversations[b : b + batch]]
        groups += sample_rollouts(engine, prompts, num_samples, max_new_tokens, temperature, top_k, seeds[b : b + batch])
    return groups


def sample_step(run, engine, task, pool, order, step, args):
    """
    This rank's prompts of a step (step_prompts over `order`, a permutation of the pool), K
    completions of each (sample_groups with the model in eval mode, inside run.interruptible(): a
    stop signal saves and exits) judged by the task's verifier (score_groups). Returns (mine:
    [(slot, pool position, seed)], conversations, groups: one list of Rollout per prompt).
    """
    mine = step_prompts(order, step, args.questions_per_step, args.seed, run.rank, run.world_size)
    conversations = [pool[p] for _, p, _ in mine]
    run.model.eval()
    with run.interruptible():
        groups = sample_groups(engine, conversations, [s for _, _, s in mine], args.num_samples, args.max_new_tokens, args.temperature, args.top_k or None, args.sampling_batch_size)
    run.model.train()
    score_groups(task, conversations, groups)
    return mine, conversations, groups


def score_groups(task, conversations, groups):
    """Judge every rollout with the task's verifier: correct = task.evaluate(conversation, text),
    reward = task.reward(...), and for a task with score() coverage = its "coverage" (else None)."""
    score = getattr(task, "score", None)
    for conversation, group in zip(conversations, groups):
        for r in group:
            r.correct = bool(task.evaluate(conversation, r.text))
            r.reward = float(task.reward(conversation, r.text))
            r.coverage = float(score(conversation, r.text)["coverage"]) if callable(score) else None


def all_sum(values, device):
    """A list of floats summed over ranks (itself in one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def rollout_metrics(groups, num_samples, device):
    """
    The step-log metrics of this step's groups, over all ranks: reward (mean), train_pass@1
    (fraction of correct samples), train_pass@K (fraction of prompts with >= 1 correct of K),
    gen_tokens, mean_len (per completion), truncated (fraction cut by the token limit), and when
    the task scores coverage, coverage (mean over samples). Every rank must call this.
    """
    rollouts = [r for g in groups for r in g]
    scored = [r.coverage for r in rollouts if r.coverage is not None]
    local = [len(rollouts), sum(r.reward for r in rollouts), sum(r.correct for r in rollouts), sum(pass_at_k(num_samples, sum(r.correct for r in g), num_samples) for g in groups),
             len(groups), sum(len(r.tokens) for r in rollouts), sum(r.finish == "length" for r in rollouts), sum(scored), len(scored)]
    n, reward, correct, pass_k, n_q, gen_tokens, truncated, coverage, n_scored = all_sum(local, device)
    row = {"reward": reward / n, "train_pass@1": correct / n, f"train_pass@{num_samples}": pass_k / n_q, "gen_tokens": int(gen_tokens),
           "mean_len": gen_tokens / n, "truncated": truncated / n}
    return row | ({"coverage": coverage / n_scored} if n_scored else {})


def log_rl_step(run, groups, num_samples, loss, fed, mine, pool, show=(), **metrics):
    """
    The step log of an RL stage (run.log_step): rollout_metrics of the step's groups, the stage's
    own metrics, prompt_rewards ([prompt, mean reward of its samples] for every prompt of the step,
    all ranks, in slot order; prompt: its index in --task's --split or in the --prompts file, what
    reward_trend pairs revisits by), and samples_sha (each rank's hash of its sampled tokens and
    rewards: equal hashes, equal samples, what the resume tests compare). loss: the step's loss
    summed over ranks; fed: the tokens through forward and backward, all ranks (for MFU, with the
    decode's forward). mine: this rank's [(slot, pool position, seed)] (sample_step), one per group.
    show: the stage's own metrics for the console line, after reward, pass@1, pass@K (and coverage).
    """
    digest = hashlib.sha256(json.dumps([[r.tokens, r.reward] for g in groups for r in g]).encode()).hexdigest()[:16]
    prompt_rewards = [(slot, pool.indices[p], statistics.fmean(r.reward for r in g)) for (slot, p, _), g in zip(mine, groups)]
    prompt_rewards = [[q, reward] for _, q, reward in sorted(x for part in run.gather(prompt_rewards) for x in part)]
    row = rollout_metrics(groups, num_samples, run.device) | metrics | {"prompt_rewards": prompt_rewards, "samples_sha": ",".join(run.gather(digest))}
    flops = run.flops_per_token * fed + run.flops_per_token / 3 * row["gen_tokens"]  # forward + backward of the updates, forward of the decode
    show = ("reward", "train_pass@1", f"train_pass@{num_samples}", *show) + (("coverage",) if "coverage" in row else ())
    run.log_step(loss, row["gen_tokens"], flops=flops, show=show, **row)


def micro_batches(rows, batch_size, pad_id, device=None):
    """
    rows: a list of (Rollout, advantage or None) as micro-batches of batch_size, sorted by length
    (less padding): a list of (advantages fp32 [B] or None, inputs, targets, tokens fed) with
    inputs / targets from collate_rollouts.
    """
    rows = sorted(rows, key=lambda ra: len(ra[0].prompt) + len(ra[0].tokens))
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        x, y = collate_rollouts([r for r, _ in chunk], pad_id, device)
        adv = torch.tensor([a for _, a in chunk], dtype=torch.float32, device=device) if chunk[0][1] is not None else None
        out.append((adv, x, y, sum(len(r.prompt) + len(r.tokens) - 1 for r, _ in chunk)))
    return out


def optimizer_step(model, optimizer):
    """One optimizer step and zero_grad; a rank with nothing to train on joins the collective update
    with zero gradients for the trainable parameters. Returns the gradient norm (float)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:  # frozen weights (a LoRA run's base) take no step
            p.grad = torch.zeros_like(p)
    grad_norm = optimizer.step()
    model.zero_grad(set_to_none=True)
    return float(grad_norm)


def evaluate_policy(run, model, name, task, args):
    """
    The RL stages' evaluation, inside run.evaluating() (a nanochat.training.RunState): pass@1 ..
    pass@k of --eval-samples samples on --eval-problems problems of `task` (named `name`) at the
    training temperature (nanochat.chat_eval.evaluate_task: the same problems and seeds every
    time), printed with the per-bucket table when the task has buckets or a coverage. Logs the row
    {"step", "eval_pass@k"..., "eval_coverage" (tasks with score())} and keeps it in run.loop
    ("first_eval", "last_eval"). Returns True when training should stop early (run.early_stop on pass@1).
    """
    with run.evaluating():
        r = evaluate_task(model, run.tokenizer, name, task, max_problems=args.eval_problems, num_samples=args.eval_samples,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
        row = {"step": run.step} | {f"eval_pass@{k}": v for k, v in r["pass_at_k"].items()} | ({"eval_coverage": r["coverage"]} if "coverage" in r else {})
        run.loop["last_eval"] = row
        run.loop.setdefault("first_eval", row)
        coverage = f" | coverage {r['coverage']:.4f}" if "coverage" in r else ""
        print0(f"step {run.step:05d} | {name} {args.eval_split} ({r['problems']} problems, {args.eval_samples} samples, T={args.temperature}) | "
               + " | ".join(f"pass@{k} {v:.4f}" for k, v in r["pass_at_k"].items()) + coverage)
        table = bucket_table([r])
        if table:
            print0(table)
        run.log(row)
    return run.early_stop(row["eval_pass@1"], higher_is_better=True)


def reward_trend(metrics_path, part=0.2):
    """
    Whether the training reward rose over a run, from the step rows of metrics_path (a
    metrics.jsonl). Two measures:
    - the mean step reward of the first and of the last `part` of the steps (at least 2 each),
      their difference and its 95% interval (normal approximation, unequal variances: 1.96 x
      sqrt(s1^2/n1 + s2^2/n2), the steps taken as independent). The per-step reward moves with the
      step's prompt mix, which is what the interval measures. Keys "reward_first", "reward_last",
      "reward_rise", "reward_rise_lo", "reward_rise_hi", "reward_steps" (n per end).
    - when prompts were revisited (--max-prompts, or more than one pass over the pool): the paired
      change of each revisited prompt's mean reward from its first visit to its last (log_rl_step's
      prompt_rewards), its mean and 95% interval over the prompts (1.96 x s / sqrt(n)): the same
      prompts at both ends, so no prompt-mix noise. Keys "revisit_first", "revisit_last",
      "revisit_rise", "revisit_rise_lo", "revisit_rise_hi", "revisit_prompts" (n, at least 2).
    Returns {} with fewer than 4 steps (or no metrics file: ranks > 0).
    """
    rows = [row for row in read_jsonl(metrics_path) if row.get("reward") is not None]
    rewards = [row["reward"] for row in rows]
    n = max(2, int(len(rewards) * part))
    if len(rewards) < 2 * n:
        return {}
    first, last = rewards[:n], rewards[-n:]
    rise = statistics.fmean(last) - statistics.fmean(first)
    half = Z95 * math.sqrt((statistics.variance(first) + statistics.variance(last)) / n)
    trend = {"reward_first": statistics.fmean(first), "reward_last": statistics.fmean(last), "reward_rise": rise,
             "reward_rise_lo": rise - half, "reward_rise_hi": rise + half, "reward_steps": n}
    visits = {}
    for row in rows:
        for prompt, reward in row.get("prompt_rewards") or ():
            visits.setdefault(prompt, []).append(reward)
    pairs = [(v[0], v[-1]) for v in visits.values() if len(v) >= 2]
    if len(pairs) >= 2:
        diffs = [b - a for a, b in pairs]
        rise, half = statistics.fmean(diffs), Z95 * statistics.stdev(diffs) / math.sqrt(len(diffs))
        trend |= {"revisit_first": statistics.fmean(a for a, _ in pairs), "revisit_last": statistics.fmean(b for _, b in pairs), "revisit_rise": rise,
                  "revisit_rise_lo": rise - half, "revisit_rise_hi": rise + half, "revisit_prompts": len(pairs)}
    return trend


def print_reward_trend(trend):
    """The console lines of reward_trend: the reward of the first and last steps, and of the
    revisited prompts' first and last visits, each rise with its interval and a verdict."""
    def verdict(lo, hi):
        return "rose" if lo > 0 else "fell" if hi < 0 else "no change beyond the interval"

    if trend:
        lo, hi = trend["reward_rise_lo"], trend["reward_rise_hi"]
        print0(f"reward: {trend['reward_first']:.4f} over the first {trend['reward_steps']} steps, {trend['reward_last']:.4f} over the last "
               f"{trend['reward_steps']}: {trend['reward_rise']:+.4f} [{lo:+.4f}, {hi:+.4f}] (95%), {verdict(lo, hi)}")
    if "revisit_rise" in trend:
        lo, hi = trend["revisit_rise_lo"], trend["revisit_rise_hi"]
        print0(f"reward of the {trend['revisit_prompts']} revisited prompts: {trend['revisit_first']:.4f} at their first visit, {trend['revisit_last']:.4f} "
               f"at their last: {trend['revisit_rise']:+.4f} [{lo:+.4f}, {hi:+.4f}] (95%, paired), {verdict(lo, hi)}")


def eval_summary(run, name, split, eval_samples):
    """The report metrics of the first and last evaluations ("<task>_pass@1_before", ..._after, and
    pass@k, coverage), printed as one line. Returns the dict."""
    metrics, key = {}, name.lower()
    for when, ev in (("before", run.loop.get("first_eval")), ("after", run.loop.get("last_eval"))):
        for metric in ("pass@1", f"pass@{eval_samples}", "coverage"):
            if ev and ev.get(f"eval_{metric}") is not None:
                metrics[f"{key}_{metric}_{when}"] = ev[f"eval_{metric}"]
    print0(f"{name} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
