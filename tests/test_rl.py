"""
RL on GSM8K (nanochat/rl.py, scripts/chat_rl.py): group advantages on hand-made rewards, the
policy-gradient loss on a toy tabular policy (sign, exact gradient, masking, PPO clipping, KL),
RSFT selection, rollout collation and the conversation written for kept samples, sampling against
the engine, and chat_rl (GRPO) end to end on a tiny random GPT (resume vs uninterrupted; 2 ranks vs
1 process, for chat_rsft too). RSFT's own stage and the MultiHop runs: tests/test_rsft.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import byte_tokenizer
from helpers.rl_util import link_sft, make_sft_base, run_main
from helpers.scripts_util import SHARED_DATA, read_metrics, run_script
from nanochat.checkpoint_manager import checkpoint_dir, load_checkpoint
from nanochat.common import NanochatError
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.rl import Rollout, collate_rollouts, group_advantages, policy_gradient_loss, reward_trend, rollout_to_conversation, sample_rollouts, select_correct, token_logprobs
from tasks.common import validate_conversation

TOK = byte_tokenizer()
S = TOK.special_tokens
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tasks", "gsm8k")), reason="needs ../shared/data")


# ------------------------------------------------------------------------------------------------ advantages


def test_group_advantages_on_hand_made_rewards():
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.5, 1.5, 1.0, 1.0]]
    adv = group_advantages(rewards, eps=0.0)
    s3 = (0.1875) ** 0.5  # population std of (1, 1, 1, 0)
    s4 = (0.125) ** 0.5  # of (0.5, 1.5, 1, 1)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.25 / s3, 0.25 / s3, 0.25 / s3, -0.75 / s3], [-0.5 / s4, 0.5 / s4, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    # without the std division: only centred, and a uniform group still gets nothing
    torch.testing.assert_close(group_advantages(rewards, normalize_std=False), torch.tensor(rewards) - torch.tensor(rewards).mean(1, keepdim=True))
    # eps keeps a nearly uniform group bounded
    assert group_advantages([[1.0, 1.0 + 1e-9]]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="num_prompts"):
        group_advantages([1.0, 0.0])


# ------------------------------------------------------------------------------------------------ the loss on a toy policy


def toy_logprobs(table, tokens):
    """A tabular policy: logits table [T, V] (one free distribution per position). tokens [B, T]."""
    return F.log_softmax(table, dim=-1)[torch.arange(tokens.size(1)), tokens]


def test_policy_gradient_raises_positive_and_lowers_negative_advantage_tokens():
    torch.manual_seed(0)
    T, V = 5, 7
    table = torch.randn(T, V, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1]])  # position 4 of row 0, 2 of row 1: tool-forced
    adv = torch.tensor([1.0, -1.0])
    n = mask.sum()
    loss, stats = policy_gradient_loss(toy_logprobs(table, tokens), adv, mask, n)
    loss.backward()
    # exact gradient: d loss / d table[t] = -sum_b A_b m_bt (onehot(tok_bt) - softmax(table[t])) / n
    p = F.softmax(table.detach(), dim=-1)
    expected = torch.zeros(T, V)
    for b in range(2):
        for t in range(T):
            if mask[b, t]:
                expected[t] -= adv[b] * (F.one_hot(tokens[b, t], V).float() - p[t]) / n
    torch.testing.assert_close(table.grad, expected)
    assert stats["clipped"].item() == 0 and stats["kl"].item() == 0
    # one gradient step: the positive row becomes more likely, the negative one less
    before = toy_logprobs(table.detach(), tokens)
    after = toy_logprobs(table.detach() - 1.0 * table.grad, tokens)
    assert (after[0, :4] > before[0, :4]).all()
    assert (after[1, [0, 1, 3, 4]] < before[1, [0, 1, 3, 4]]).all()
    # a masked (tool-forced) token gets no gradient: row 0 alone leaves position 4 untouched
    alone = torch.randn(T, V, requires_grad=True)
    policy_gradient_loss(toy_logprobs(alone, tokens[:1]), adv[:1], mask[:1], mask[0].sum())[0].backward()
    assert alone.grad[4].abs().sum() == 0 and alone.grad[:4].abs().sum(dim=1).min() > 0


def test_clipped_ratio_and_kl():
    T, V = 3, 4
    table = torch.zeros(T, V, requires_grad=True)
    tokens = torch.tensor([[0, 1, 2]])
    mask = torch.ones(1, 3)
    lp = toy_logprobs(table, tokens)
    # the sampling policy gave these tokens probability e^-0.5 times what the model now gives (ratio
    # 1.65 > 1 + 0.2) at position 0, the same at 1, e^+0.5 times (ratio 0.61) at 2
    old = lp.detach() + torch.tensor([[-0.5, 0.0, 0.5]])
    loss, stats = policy_gradient_loss(lp, torch.tensor([1.0]), mask, 3, old_logprobs=old, clip_eps=0.2)
    loss.backward()
    assert stats["clipped"].item() == 2  # positions 0 and 2 are outside [0.8, 1.2]
    g = table.grad
    assert g[0].abs().sum() == 0  # A > 0 and ratio above 1 + eps: clipped, no gradient
    assert g[1].abs().sum() > 0 and g[2].abs().sum() > 0  # inside the band / below it with A > 0: still pushed up
    # KL (k3) to a reference: 0 at the reference, > 0 elsewhere, its gradient pulls towards it
    table2 = torch.zeros(T, V, requires_grad=True)
    ref = toy_logprobs(torch.zeros(T, V), tokens)
    loss0, st0 = policy_gradient_loss(toy_logprobs(table2, tokens), torch.zeros(1), mask, 3, ref_logprobs=ref, kl_coef=1.0)
    assert loss0.item() == pytest.approx(0.0, abs=1e-7) and st0["kl"].item() == pytest.approx(0.0, abs=1e-7)
    shifted = torch.tensor([[2.0, 0, 0, 0]] * T, requires_grad=True)  # more mass on token 0 than the reference
    loss1, st1 = policy_gradient_loss(toy_logprobs(shifted, tokens), torch.zeros(1), mask, 3, ref_logprobs=ref, kl_coef=1.0)
    loss1.backward()
    assert st1["kl"].item() > 0 and shifted.grad[0, 0] > 0  # descending lowers the over-weighted logit


# ------------------------------------------------------------------------------------------------ RSFT, collation, kept samples


def make_rollout(correct, n=3):
    return Rollout(prompt=[1], tokens=list(range(n)), mask=[1] * n, finish="length", correct=correct)


def test_rsft_keeps_exactly_the_correct_samples():
    pattern = [[True, False, True, True], [False, False, False, False], [False, True, False, False]]
    groups = [[make_rollout(c) for c in row] for row in pattern]
    kept = select_correct(groups)
    assert kept == [(q, s) for q, row in enumerate(pattern) for s, c in enumerate(row) if c]
    assert all(groups[q][s].correct for q, s in kept)
    assert select_correct(groups, max_per_question=2) == [(0, 0), (0, 2), (2, 1)]
    assert select_correct([[make_rollout(False)]]) == []


def test_rsft_min_coverage_drops_right_answers_without_their_reasoning():
    coverage = [[1.0, 0.5, None, 1.0], [0.0, 1.0, 0.99, 1.0]]
    groups = [[make_rollout(True) for _ in row] for row in coverage]
    groups[1][3].correct = False  # full coverage, wrong answer: never kept
    for q, row in enumerate(coverage):
        for s, c in enumerate(row):
            groups[q][s].coverage = c
    assert select_correct(groups) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    assert select_correct(groups, min_coverage=1.0) == [(0, 0), (0, 2), (0, 3), (1, 1)]  # None: the task scores none
    assert select_correct(groups, max_per_question=1, min_coverage=0.9) == [(0, 0), (1, 1)]


def test_rsft_max_pass_rate_skips_the_prompts_already_solved():
    pattern = [[True] * 4, [True, True, True, False], [False] * 4, [True, False, False, False]]
    groups = [[make_rollout(c) for c in row] for row in pattern]
    assert select_correct(groups, max_pass_rate=1.0) == select_correct(groups)
    assert select_correct(groups, max_pass_rate=0.99) == [(1, 0), (1, 1), (1, 2), (3, 0)]  # 4/4 solved: skipped
    assert select_correct(groups, max_pass_rate=0.5) == [(3, 0)]  # 3/4 is above one half
    # the pass rate counts the samples that would be kept: right answers short of min_coverage do not pass
    for r in groups[0][:2]:
        r.coverage = 0.5
    assert select_correct(groups, max_pass_rate=0.5, min_coverage=1.0) == [(0, 2), (0, 3), (3, 0)]


def test_rsft_distinct_keeps_one_of_each_identical_winner():
    texts = [[[1, 2], [1, 2], [3], [1, 2]], [[5], [6], [5], [7]]]
    groups = [[Rollout(prompt=[9], tokens=t, mask=[1] * len(t), finish="stop", correct=True) for t in row] for row in texts]
    groups[1][1].correct = False  # a loser is never kept, distinct or not
    assert select_correct(groups, distinct=True) == [(0, 0), (0, 2), (1, 0), (1, 3)]  # the first of each copy, in order
    assert select_correct(groups, distinct=True, max_per_question=1) == [(0, 0), (1, 0)]
    # the pass rate counts every winner, copies included: group 0 (4/4) is skipped at 0.99
    assert select_correct(groups, distinct=True, max_pass_rate=0.99) == [(1, 0), (1, 3)]


def test_reward_trend_compares_the_first_and_last_fifth_of_the_steps(tmp_path):
    def trend(rewards, extra_rows=()):
        path = tmp_path / "metrics.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in [{"step": i + 1, "reward": r} for i, r in enumerate(rewards)] + list(extra_rows)))
        return reward_trend(str(path))

    noise = [0.02 * ((7 * i) % 5 - 2) for i in range(50)]  # -0.04 .. +0.04, the same at both ends
    rising = trend([0.2 + 0.01 * i + e for i, e in enumerate(noise)], extra_rows=[{"step": 50, "eval_pass@1": 0.9}])  # eval rows carry no reward
    assert rising["reward_steps"] == 10 and rising["reward_first"] == pytest.approx(0.245, abs=0.01) and rising["reward_last"] == pytest.approx(0.645, abs=0.01)
    assert rising["reward_rise_lo"] > 0.3 and rising["reward_rise"] == pytest.approx(0.4, abs=0.01)
    flat = trend([0.5 + e for e in noise])
    assert flat["reward_rise_lo"] < 0 < flat["reward_rise_hi"]
    falling = trend([0.8 - 0.01 * i + e for i, e in enumerate(noise)])
    assert falling["reward_rise_hi"] < 0
    assert trend([0.1, 0.2, 0.3]) == {} and reward_trend(str(tmp_path / "missing.jsonl")) == {}
    assert "revisit_rise" not in rising  # no prompt_rewards: nothing to pair


def test_reward_trend_pairs_each_revisited_prompt_first_visit_with_its_last(tmp_path):
    """Prompts 0-3 revisited every two steps: an easy pair (0.8) and a hard pair (0.2) alternate,
    so the step reward swings by 0.6 with the prompt mix, while each prompt's own reward rises by
    0.1 from its first visit to its last. The paired measure sees the rise; prompts seen once
    (4, 5) do not enter it."""
    rows = []
    for step in range(10):
        visit, pair = step // 2, step % 2  # visits 0..4 of each prompt
        prompts = [[q, (0.8 if pair == 0 else 0.2) + 0.025 * visit + 0.01 * (q % 2)] for q in (2 * pair, 2 * pair + 1)]
        prompts += [[4 + pair, 0.5]] if step == 9 - pair else []
        rows.append({"step": step + 1, "reward": sum(r for _, r in prompts) / len(prompts), "prompt_rewards": prompts})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trend = reward_trend(str(path))
    assert trend["revisit_prompts"] == 4 and trend["revisit_rise"] == pytest.approx(0.1)
    assert trend["revisit_first"] == pytest.approx((0.8 + 0.81 + 0.2 + 0.21) / 4) and trend["revisit_last"] == pytest.approx(trend["revisit_first"] + 0.1)
    assert trend["revisit_rise_lo"] == pytest.approx(0.1) == trend["revisit_rise_hi"]  # every prompt rose by exactly 0.1
    assert trend["reward_rise_lo"] < 0 < trend["reward_rise_hi"]  # the unpaired fifths drown it in the prompt mix
    for row in rows:  # one prompt less a step in the second half of the pairs: the interval opens, the mean holds
        row["prompt_rewards"] = [[q, r + (0.02 if q == 1 and row["step"] == 9 else 0.0)] for q, r in row["prompt_rewards"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    noisy = reward_trend(str(path))
    assert noisy["revisit_rise"] == pytest.approx(0.105) and noisy["revisit_rise_lo"] < 0.105 < noisy["revisit_rise_hi"] and noisy["revisit_rise_lo"] > 0


def test_collate_trains_only_sampled_completion_tokens():
    a = Rollout(prompt=[10, 11, 12], tokens=[20, 21, 22, 23, 24], mask=[1, 0, 0, 1, 1], finish="stop")
    b = Rollout(prompt=[30], tokens=[40, 41], mask=[1, 1], finish="length")
    x, y = collate_rollouts([a, b], pad_id=0)
    assert x.tolist() == [[10, 11, 12, 20, 21, 22, 23], [30, 40, 0, 0, 0, 0, 0]]
    assert y.tolist() == [[-1, -1, 20, -1, -1, 23, 24], [40, 41, -1, -1, -1, -1, -1]]


def test_kept_sample_conversation_renders_back_to_the_same_tokens():
    question = {"messages": [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "#### 42"}]}
    prompt = TOK.render_for_completion(question)
    pieces = [  # (tokens, mask): what the engine yields, tool output forced (mask 0)
        (TOK.encode("It is "), 1),
        ([S["<|python_start|>"]] + TOK.encode("6*7") + [S["<|python_end|>"]], 1),
        ([S["<|output_start|>"]] + TOK.encode("42") + [S["<|output_end|>"]], 0),
        (TOK.encode(" so #### 42") + [S["<|assistant_end|>"]], 1),
    ]
    tokens = [t for ids, _ in pieces for t in ids]
    mask = [m for ids, m in pieces for _ in ids]
    r = Rollout(prompt, tokens, mask, "stop")
    conversation = rollout_to_conversation(TOK, question, r)
    assert conversation["messages"][-1]["content"] == [
        {"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, {"type": "text", "text": " so #### 42"}
    ]
    validate_conversation(conversation, "test")
    ids, render_mask = TOK.render_conversation(conversation, max_tokens=1 << 20)
    assert ids == prompt + tokens  # the training data of a re-run is exactly what was sampled
    assert render_mask[len(prompt):] == mask
    # a completion cut inside a tool call keeps the call's text as text
    cut = Rollout(prompt, TOK.encode("x ") + [S["<|python_start|>"]] + TOK.encode("1+"), [1] * 5, "length")
    assert rollout_to_conversation(TOK, question, cut)["messages"][-1]["content"] == [{"type": "text", "text": "x "}, {"type": "text", "text": "1+"}]


# ------------------------------------------------------------------------------------------------ sampling on a real tiny GPT


def tiny_gpt(seed=0):
    model = GPT(GPTConfig(sequence_len=64, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights(seed=seed)
    return model.eval()


def test_sample_rollouts_match_the_engine_and_token_logprobs_the_logits():
    model = tiny_gpt()
    engine = Engine(model, TOK)
    prompts = [TOK.render_for_completion({"messages": [{"role": "user", "content": q}]}) for q in ("hi", "what is 2+2?", "go")]
    groups = sample_rollouts(engine, prompts, num_samples=3, max_new_tokens=12, temperature=1.0, seeds=[5, 6, 7])
    stops = {S["<|assistant_end|>"], TOK.bos_token_id}
    for p, seed, group in zip(prompts, [5, 6, 7], groups):
        ref, ref_masks = engine.generate_batch(p, num_samples=3, max_tokens=12, temperature=1.0, seed=seed)
        for r, t, m in zip(group, ref, ref_masks):
            assert r.prompt == p and len(r.tokens) == len(r.mask) <= 12
            assert (r.finish == "stop") == (r.tokens[-1] in stops)
            body = r.tokens[:-1] if r.finish == "stop" else r.tokens
            assert body == t and r.mask[: len(body)] == m and r.text == TOK.decode(t)
    # a prompt's samples do not depend on the rest of the batch
    alone = sample_rollouts(engine, prompts[1:2], num_samples=3, max_new_tokens=12, seeds=[6])[0]
    assert [r.tokens for r in alone] == [r.tokens for r in groups[1]]
    x, y = collate_rollouts([r for g in groups for r in g], TOK.bos_token_id)
    lp = token_logprobs(model, x, y)
    full = F.log_softmax(model(x), dim=-1)
    expected = torch.where(y >= 0, full.gather(-1, y.clamp(min=0)[..., None])[..., 0], torch.zeros(()))
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)
    # at the sampling temperature: the log-probs of softmax(logits / T), the distribution the engine samples
    lp_t = token_logprobs(model, x, y, temperature=0.7)
    full_t = F.log_softmax(model(x) / 0.7, dim=-1)
    expected_t = torch.where(y >= 0, full_t.gather(-1, y.clamp(min=0)[..., None])[..., 0], torch.zeros(()))
    torch.testing.assert_close(lp_t, expected_t, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature > 0"):
        token_logprobs(model, x, y, temperature=0.0)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_policy_gradient_at_the_sampling_temperature_is_the_gradient_of_the_expected_reward(temperature):
    """One-token completions of one prompt, every token of the vocabulary enumerated with its sampling
    probability pi_T(a) as weight: the expected policy-gradient loss's gradient must equal the gradient of
    -E_{a ~ pi_T}[R(a)], computed directly. With the log-probs at temperature 1 instead (what chat_rl
    used to train on while sampling at T 0.7) it does not, unless T is 1."""
    model = tiny_gpt(seed=3).train()
    prompt = TOK.render_for_completion({"messages": [{"role": "user", "content": "pick"}]})
    V = model.config.vocab_size
    x = torch.tensor([prompt] * V)
    y = torch.full_like(x, -1)
    y[:, -1] = torch.arange(V)  # row a: the completion is token a
    reward = torch.rand(V, generator=torch.Generator().manual_seed(0))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    probs = F.softmax(model(x[:1])[0, -1] / temperature, dim=-1).detach()  # pi_T(a)
    # policy_gradient_loss normalises by the token count: weight each row by V * pi_T(a) for the expectation
    lp = token_logprobs(model, x, y, temperature)
    pg = grads(policy_gradient_loss(lp, reward * probs * V, y >= 0, V)[0])
    exact = grads(-(F.softmax(model(x[:1])[0, -1] / temperature, dim=-1) * reward).sum())
    torch.testing.assert_close(pg, exact, atol=1e-6, rtol=1e-4)
    off = grads(policy_gradient_loss(token_logprobs(model, x, y), reward * probs * V, y >= 0, V)[0])
    assert torch.allclose(off, exact, atol=1e-6, rtol=1e-4) == (temperature == 1.0)


# ------------------------------------------------------------------------------------------------ chat_rl end to end


@pytest.fixture(scope="module")
def rl_env(tmp_path_factory):
    """A tmp base dir with the byte tokenizer and a tiny random SFT GPT (tag "t")."""
    base = tmp_path_factory.mktemp("rl") / "base"
    return {"base": base, "env": make_sft_base(base)}


RL_ARGS = ["--questions-per-step", 2, "--num-samples", 4, "--max-new-tokens", 12, "--eval-every", -1, "--eval-problems", 2, "--eval-samples", 2, "--device-batch-size", 3]


@pytest.mark.slow
@needs_data
def test_chat_rl_script_runs_and_reports(rl_env):
    base = rl_env["base"]
    proc = run_script("scripts.chat_rl", *RL_ARGS, "--num-iterations", 2, env=rl_env["env"], timeout=300)
    assert "GSM8K test:" in proc.stdout
    ckpt = checkpoint_dir("rl", "t", str(base))
    _, _, meta = load_checkpoint(ckpt, 2, "cpu")
    assert meta["stage"] == "rl" and meta["parent"] == {"stage": "sft", "model_tag": "t", "step": 5} and meta["resolved"]["num_iterations"] == 2
    rows = read_metrics(os.path.join(ckpt, "run", "metrics.jsonl"))
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # a random byte model gets nothing right: no signal, no update
        assert r["reward"] == 0.0 and r["train_pass@4"] == 0.0 and r["skipped"] and r["tok_per_s"] > 0 and r["gen_tokens"] > 0
    evals = [r for r in rows if "eval_pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2] and all("eval_pass@2" in r for r in evals)
    assert "bucket TVD" in proc.stdout and "measure on more" in proc.stdout  # 2 evaluation problems: the report flags its own noise
    with open(base / "report" / "chat_rl.json") as f:
        record = json.load(f)
    assert record["args"]["task"] == "GSM8K" and record["metrics"]["gsm8k_pass@1_after"] == 0.0 and record["metrics"]["steps"] == 2
    assert 0 < record["metrics"]["bucket_tvd"] <= 1 and 0 < record["metrics"]["length_tvd"] <= 1


def parity_reward(monkeypatch):
    """Make GSM8K judge a completion correct when its text has an even length: a random model then
    gets mixed groups, so every part of the update runs (the same rule as tests/helpers/rl_ddp_worker.py)."""
    from helpers.rl_ddp_worker import parity_judge
    from tasks.gsm8k import GSM8K

    monkeypatch.setattr(GSM8K, "evaluate", parity_judge)


def run_inprocess(rl_env, monkeypatch, *args, script="chat_rl"):
    from scripts import chat_rl, chat_rsft

    run_main({"chat_rl": chat_rl, "chat_rsft": chat_rsft}[script].main, RL_ARGS + list(args), rl_env["env"], monkeypatch)


def rl_rows(base, tag, stage="rl"):
    return [r for r in read_metrics(os.path.join(checkpoint_dir(stage, tag, str(base)), "run", "metrics.jsonl")) if "reward" in r]


@needs_data
def test_grpo_updates_and_resume_matches_uninterrupted(rl_env, monkeypatch):
    base = rl_env["base"]
    parity_reward(monkeypatch)
    link_sft(base, "ref")
    common = ["--num-iterations", 3, "--ppo-epochs", 2, "--kl-coef", 0.05]
    run_inprocess(rl_env, monkeypatch, *common, "--model-tag", "ref")
    link_sft(base, "cut")
    with pytest.raises(SystemExit) as stop:
        run_inprocess(rl_env, monkeypatch, *common, "--model-tag", "cut", "--stop-at-step", 2)
    assert stop.value.code == 143
    assert [r["step"] for r in rl_rows(base, "cut")] == [1, 2]
    run_inprocess(rl_env, monkeypatch, *common, "--model-tag", "cut", "--resume")
    ref, cut = rl_rows(base, "ref"), rl_rows(base, "cut")
    assert [r["step"] for r in ref] == [r["step"] for r in cut] == [1, 2, 3]
    for a, b in zip(ref, cut):
        assert a["samples_sha"] == b["samples_sha"]  # the same sampled tokens and rewards
        for key in ("reward", "loss", "grad_norm", "kl", "clip_frac", "gen_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key, a[key], b[key])
    assert any(not r["skipped"] for r in ref) and any(0 < r["reward"] < 1 for r in ref)
    assert all(r["kl"] >= 0 for r in ref) and any(r["kl"] > 0 for r in ref)  # measured after the first update of each batch
    # the weights moved away from the SFT model
    sft, _, _ = load_checkpoint(checkpoint_dir("sft", "t", str(base)), 5, "cpu")
    rl, _, _ = load_checkpoint(checkpoint_dir("rl", "ref", str(base)), 3, "cpu")
    assert any(not torch.equal(sft[k], rl[k]) for k in sft)


@needs_data
def test_bad_flags_name_the_flag(rl_env, monkeypatch):
    link_sft(rl_env["base"], "badflags")  # its own tag: another test's rl run in "t" must not answer first
    with pytest.raises(NanochatError, match="--num-samples 1 .*group"):
        run_inprocess(rl_env, monkeypatch, "--num-samples", 1)
    with pytest.raises(NanochatError, match="--temperature"):
        run_inprocess(rl_env, monkeypatch, "--temperature", 0)
    with pytest.raises(NanochatError, match="--format-reward .*--task MultiHop"):  # GSM8K's format only
        run_inprocess(rl_env, monkeypatch, "--task", "MultiHop", "--format-reward", 0.1)
    with pytest.raises(NanochatError, match="--coverage-reward needs a task that scores a reasoning path.*--task GSM8K"):
        run_inprocess(rl_env, monkeypatch, "--task", "GSM8K", "--coverage-reward", 0.5)
    with pytest.raises(NanochatError, match="--coverage-reward must be >= 0"):
        run_inprocess(rl_env, monkeypatch, "--task", "MultiHop", "--coverage-reward", -1)
    with pytest.raises(NanochatError, match="--task MMLU: not a verifiable task; expected one of GSM8K, HumanEval, MultiHop"):
        run_inprocess(rl_env, monkeypatch, "--task", "MMLU")
    with pytest.raises(NanochatError, match="--buckets hard: not a bucket of GSM8K train"):
        run_inprocess(rl_env, monkeypatch, "--buckets", "hard", "--model-tag", "badflags")
    with pytest.raises(SystemExit):  # RSFT is its own stage now: chat_rl has no --algo
        run_inprocess(rl_env, monkeypatch, "--algo", "rsft")


@needs_data
@pytest.mark.slow
def test_two_ranks_match_one_process(rl_env, monkeypatch):
    """Questions split over 2 ranks (torchrun, gloo): the same samples (seeded per question), the
    same metrics, and the same update as one process, for both stages (GRPO: chat_rl; RSFT: chat_rsft,
    whose samples file is the same line for line)."""
    base = rl_env["base"]
    for tag in ("d2", "d1", "r2", "r1"):
        link_sft(base, tag)
    common = [str(a) for a in RL_ARGS] + ["--num-iterations", "2", "--questions-per-step", "4"]  # 2 questions per rank
    grpo = ["--kl-coef", "0.05", "--ppo-epochs", "2"]
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "rl_ddp_worker.py")
    for extra in (["chat_rl", *common, *grpo, "--model-tag", "d2"], ["chat_rsft", *common, "--model-tag", "r2"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, *extra]
        proc = subprocess.run(cmd, env=rl_env["env"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parity_reward(monkeypatch)
    run_inprocess(rl_env, monkeypatch, *common[len(RL_ARGS):], *grpo, "--model-tag", "d1")
    run_inprocess(rl_env, monkeypatch, *common[len(RL_ARGS):], "--model-tag", "r1", script="chat_rsft")
    for two, one, stage in (("d2", "d1", "rl"), ("r2", "r1", "rsft")):
        a, b = rl_rows(base, two, stage), rl_rows(base, one, stage)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
        for x, y in zip(a, b):
            for key in ("reward", "train_pass@1", "train_pass@4", "gen_tokens", "skipped", "mean_len", "prompt_rewards") + (("kept",) if stage == "rsft" else ()):
                assert x[key] == y[key], (two, x["step"], key)
            for key in ("loss", "grad_norm") + (("kl", "clip_frac") if stage == "rl" else ()):
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), (two, x["step"], key, x[key], y[key])
    with open(os.path.join(checkpoint_dir("rsft", "r2", str(base)), "run", "rsft_samples.jsonl")) as f2, open(os.path.join(checkpoint_dir("rsft", "r1", str(base)), "run", "rsft_samples.jsonl")) as f1:
        assert f2.read() == f1.read()  # every rank's samples reach the file, in the same order as one process writes them
