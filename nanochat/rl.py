"""
Reinforcement learning from verifiable rewards for the chat model (scripts/chat_rl.py): sampling
groups of completions through the engine, group-normalised advantages, the token-level
policy-gradient loss, and rejection-sampling fine-tuning (RSFT) selection.

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

from dataclasses import dataclass

import torch

from nanochat.engine import GenerationRequest


@dataclass
class Rollout:
    """
    One sampled completion of one prompt.
    prompt: prompt token ids (ends with <|assistant_start|>). tokens: the completion's ids in the
    order generated, including the stop token when finish == "stop". mask: one int per token, 1 =
    sampled by the policy, 0 = forced by the engine (tool output). finish: "stop" | "length".
    text: the completion decoded without its stop token (what the task judges). reward: float.
    correct: what the task's evaluate() said.
    """

    prompt: list
    tokens: list
    mask: list
    finish: str
    text: str = ""
    reward: float = 0.0
    correct: bool = False


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


def token_logprobs(model, inputs, targets):
    """log pi(target | prefix) per position: fp32 [B, T], 0 where targets is -1. The model's own
    cross-entropy (softcapped logits, fp32), so it is the exact log-probability it trains."""
    return -model(inputs, targets, loss_reduction="none")


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


def select_correct(groups, max_per_question=None):
    """
    RSFT selection. groups: a list (one per question) of lists of Rollout with `correct` set.
    Returns [(question index, sample index)] of exactly the correct rollouts, in order, at most
    max_per_question of each question (None: all of them).
    """
    kept = []
    for q, group in enumerate(groups):
        picks = [s for s, r in enumerate(group) if r.correct]
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

