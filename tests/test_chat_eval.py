"""
Chat evaluation (nanochat/chat_eval.py): categorical scoring with stand-in models whose answers are
known, batched vs one-at-a-time scoring on a real tiny GPT, generative scoring and pass@k with a
scripted engine, HumanEval programs that pass, hang or exit early in the sandbox, the ChatCORE
centring, difficulty buckets (per-bucket sums that add up to the totals, accuracies and Wilson
intervals known by hand, coverage, MultiHop through the loop, the bucket table), the suite
(tasks.recipe.CHAT_TASKS, EVAL_TASKS, load_chat_task) and that the library never imports tasks/.
The end-to-end script run is in tests/test_mid_train.py.
"""

import ast
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import byte_tokenizer
from helpers.scripts_util import REPO, SHARED_DATA
from nanochat.chat_eval import (
    bucket_table,
    centered,
    chat_core,
    evaluate_categorical,
    evaluate_generative,
    evaluate_task,
    format_table,
    letter_token_ids,
    paired_difference,
    paired_table,
    pass_at_k,
    report_ks,
    select_problems,
)
from nanochat.common import NanochatError
from nanochat.engine import TokenEvent
from nanochat.gpt import GPT, GPTConfig
from tasks.common import Task
from tasks.multihop import BUCKETS as MULTIHOP_BUCKETS, MultiHop
from tasks.recipe import CHAT_TASKS, EVAL_TASKS, load_chat_task

TOK = byte_tokenizer()
LETTERS = "ABCDE"
needs_tasks = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tasks")), reason="needs ../shared/data")


# ------------------------------------------------------------------------------------------------ scores


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 101, 100) == 1.0
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    assert report_ks(1) == [1] and report_ks(20) == [1, 10, 20] and report_ks(100) == [1, 10, 100]


def test_centering_and_chatcore():
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.25) == 1.0
    assert centered(0.0, 0.25) == pytest.approx(-1 / 3) and centered(0.3, 0.0) == 0.3
    results = [{"centered": 0.5}, {"centered": -0.1}, {"centered": 0.2}]
    assert chat_core(results) == pytest.approx(0.2)
    assert chat_core([]) is None


def test_select_problems_is_a_fixed_subset():
    assert select_problems(5) == [0, 1, 2, 3, 4] and select_problems(5, 9) == [0, 1, 2, 3, 4]
    a = select_problems(1000, 50, seed=1)
    assert a == select_problems(1000, 50, seed=1) and len(set(a)) == 50 and a == sorted(a)
    assert a != select_problems(1000, 50, seed=2)
    assert max(a) > 500  # spread over the set, not its first items (test sets are sorted by subject)


def test_letter_tokens_must_be_single_tokens():
    assert letter_token_ids(TOK, ["A", "B"]) == [ord("A"), ord("B")]
    with pytest.raises(NanochatError, match="'AB'"):
        letter_token_ids(TOK, ["AB"])


# ------------------------------------------------------------------------------------------------ categorical


class LetterModel(torch.nn.Module):
    """
    A stand-in causal LM: at position t it favours the letter LETTERS[f] with f = (sum of the token
    ids up to t) mod 5 (logits -(j - f)^2 over the letters), and gives an even larger logit to "Z",
    which is never an answer letter, so that only scoring restricted to the letters can be right.
    """

    def __init__(self, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, sequence_len=1024)
        self.lm_head = torch.nn.Linear(1, 1)  # where the engine and the scorer look for the device

    def get_compute_dtype(self, device):
        return torch.float32

    def forward(self, idx):
        f = idx.cumsum(dim=1) % 5  # [B, T]
        logits = torch.full((*idx.shape, self.config.vocab_size), -100.0)
        for j, letter in enumerate(LETTERS):
            logits[:, :, ord(letter)] = -((j - f) ** 2).float()
        logits[:, :, ord("Z")] = 10.0
        return logits


def favoured(prompt_ids, letters):
    f = sum(prompt_ids) % 5
    return min(letters, key=lambda letter: abs(LETTERS.index(letter) - f))


class MCTask(Task):
    """Hand-made multiple-choice problems with 3 to 5 choices and prompts of different lengths;
    the answer is the stand-in model's favourite for even problems and another letter for odd ones."""

    eval_type = "categorical"

    def __init__(self, n=11, **view):
        super().__init__(**view)
        self.items = []
        for i in range(n):
            letters = list(LETTERS[: 3 + i % 3])
            conversation = {"messages": [{"role": "user", "content": f"question {i}: " + "why? " * (i % 4)}], "letters": letters}
            best = favoured(TOK.render_for_completion(conversation), letters)
            answer = best if i % 2 == 0 else next(x for x in letters if x != best)
            conversation["messages"].append({"role": "assistant", "content": answer})
            self.items.append(conversation)

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return self.items[index]

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


@pytest.mark.parametrize("batch_size, budget", [(1, 1 << 30), (4, 1 << 30), (16, 1 << 30), (16, 30 * 265 * 4 * 2)])
def test_categorical_scores_the_letter_at_the_last_prompt_position(batch_size, budget):
    task = MCTask()
    sums, outcomes = evaluate_categorical(LetterModel(TOK.vocab_size), TOK, task, list(range(len(task))), batch_size=batch_size, logits_budget_bytes=budget)
    for i, conversation in enumerate(task.items):
        assert outcomes[i][0] == favoured(TOK.render_for_completion(conversation), conversation["letters"]), i
    assert sums["problems"] == 11 and sums["correct"] == 6  # the even problems
    assert sums["chance"] == pytest.approx(sum(1 / len(c["letters"]) for c in task.items))


def test_evaluate_task_centres_by_the_real_number_of_choices():
    task = MCTask()
    r = evaluate_task(LetterModel(TOK.vocab_size), TOK, "MC", task, batch_size=3)
    chance = sum(1 / (3 + i % 3) for i in range(11)) / 11
    assert r["accuracy"] == pytest.approx(6 / 11) and r["chance"] == pytest.approx(chance)
    assert r["centered"] == pytest.approx((6 / 11 - chance) / (1 - chance))
    r = evaluate_task(LetterModel(TOK.vocab_size), TOK, "MC", task, max_problems=4, seed=0)
    assert r["problems"] == 4
    assert "| MC | categorical | 4 |" in format_table([r], chat_core([r]), ("MC",))


@needs_tasks
def test_batched_scoring_equals_one_at_a_time_on_a_real_gpt():
    from tasks.arc import ARC

    config = GPTConfig(sequence_len=64, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights(seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the init zeroes the output projections (every block the identity): use random ones
        for p in model.parameters():
            p.normal_(0.0, 0.2, generator=gen)
    model.eval()
    task = ARC(subset="ARC-Challenge", split="test", tasks_dir=os.path.join(SHARED_DATA, "tasks"))
    indices = list(range(0, 120, 10))
    single_sums, single = evaluate_categorical(model, TOK, task, indices, batch_size=1)
    batched_sums, batched = evaluate_categorical(model, TOK, task, indices, batch_size=5)
    assert single_sums == batched_sums and sorted(single) == indices
    for i in indices:  # padding after a prompt and the batch around it change nothing
        assert single[i][0] == batched[i][0]
        assert batched[i][1] == pytest.approx(single[i][1], abs=1e-4)
    assert len({tuple(logits) for _, logits, _ in single.values()}) == len(indices)  # the logits depend on the prompt


# ------------------------------------------------------------------------------------------------ generative


class ScriptedEngine:
    """A stand-in Engine: reply(prompt text, sample index, seed) -> the completion text, streamed
    like Engine.generate_many (one TokenEvent per running row per step, the stop token last)."""

    def __init__(self, reply):
        self.reply = reply
        self.model = SimpleNamespace(config=SimpleNamespace(sequence_len=4096), lm_head=torch.nn.Linear(1, 1))
        self.requests = []

    def generate_many(self, requests):
        self.requests += requests
        stop = TOK.special_tokens["<|assistant_end|>"]
        rows = {(key, s): TOK.encode(self.reply(TOK.decode(r.tokens), s, r.seed)) + [stop] for key, r in enumerate(requests) for s in range(r.num_samples)}
        step = 0
        while any(step < len(tokens) for tokens in rows.values()):
            yield [TokenEvent(key, s, tokens[step], 1, "stop" if step == len(tokens) - 1 else None) for (key, s), tokens in rows.items() if step < len(tokens)]
            step += 1


class CountTask(Task):
    """Generative problems "count i": correct answers are "#### i"; problem 4's judge raises."""

    eval_type = "generative"

    def num_examples(self):
        return 8

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"count {index}"}, {"role": "assistant", "content": f"#### {index}"}]}

    def evaluate(self, conversation, completion):
        if conversation["messages"][0]["content"] == "count 4":
            raise RuntimeError("judge exploded")
        return completion.strip() == conversation["messages"][1]["content"]


def test_generative_pass_at_k_and_judge_errors():
    n = 4

    def reply(prompt, sample, seed):
        i = int(prompt.split("count ")[1][0])
        return f"#### {i}" if sample < i % (n + 1) else "#### -1"  # problem i: i mod 5 correct samples of 4 (capped)

    engine = ScriptedEngine(reply)
    task = CountTask()
    sums, outcomes = evaluate_generative(engine, TOK, task, list(range(8)), num_samples=n, max_new_tokens=16, temperature=0.7, top_k=5, seed=100, batch_size=3)
    correct = {i: 0 if i == 4 else min(n, i % (n + 1)) for i in range(8)}
    assert sums["problems"] == 8 and sums["samples"] == 32
    assert sums["correct_samples"] == sum(correct.values())
    assert sums["eval_errors"] == n  # problem 4's judge raised for its 4 right samples: failures, not a crash
    for k in report_ks(n):
        assert sums[f"pass@{k}"] == pytest.approx(sum(pass_at_k(n, c, k) for c in correct.values()))
    assert [sum(ok for _, ok in outcomes[i]) for i in range(8)] == [correct[i] for i in range(8)]
    # the engine saw the rendered prompt primed for the reply, the sampling settings, and seed + index
    r = engine.requests[3]
    assert r.tokens == TOK.render_for_completion(task[3]) and r.tokens[-1] == TOK.special_tokens["<|assistant_start|>"]
    assert (r.num_samples, r.max_tokens, r.temperature, r.top_k, r.seed) == (n, 16, 0.7, 5, 103)
    assert [o[0][0] for o in outcomes.values()] == ["#### -1", "#### 1", "#### 2", "#### 3", "#### 4", "#### -1", "#### 6", "#### 7"]


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(NanochatError, match="--temperature"):
        evaluate_task(LetterModel(TOK.vocab_size), TOK, "Count", CountTask(), num_samples=3, temperature=0.0)


@needs_tasks
def test_humaneval_in_the_sandbox_pass_hang_and_early_exit_are_judged():
    from tasks.humaneval import HumanEval

    task = HumanEval(tasks_dir=os.path.join(SHARED_DATA, "tasks"), timeout=2.0)
    solutions = {task[i]["messages"][0]["content"]: task.rows[i]["canonical_solution"] for i in range(2)}
    bad = {1: "    while True:\n        pass\n", 2: "    import os\n    os._exit(0)\n", 3: "    raise SystemExit(0)\n"}

    def reply(prompt, sample, seed):
        body = next(sol for p, sol in solutions.items() if p in prompt)
        return body if sample == 0 else bad[sample]

    sums, outcomes = evaluate_generative(ScriptedEngine(reply), TOK, task, [0, 1], num_samples=4, max_new_tokens=64, temperature=1.0)
    assert [ok for _, ok in outcomes[0]] == [True, False, False, False]
    assert [ok for _, ok in outcomes[1]] == [True, False, False, False]
    assert sums["correct_samples"] == 2 and sums["eval_errors"] == 0
    assert sums["pass@1"] == pytest.approx(2 * 0.25) and sums["pass@4"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ buckets


class BucketMCTask(MCTask):
    """MCTask with buckets: problems 0-3 "low" (0 and 2 right: 2 of 4), 4-10 "high" (4, 6, 8, 10
    right: 4 of 7), none in "empty"."""

    buckets = ("low", "high", "empty")

    def get_example(self, index):
        return self.items[index] | {"bucket": "low" if index < 4 else "high"}


def add_sums(a, b):
    return {k: add_sums(a[k], b[k]) if isinstance(a[k], dict) else a[k] + b[k] for k in a}


def test_categorical_bucket_sums_add_up_and_give_the_known_accuracies():
    model, task = LetterModel(TOK.vocab_size), BucketMCTask()
    sums, _ = evaluate_categorical(model, TOK, task, list(range(11)), batch_size=4)
    assert list(sums["buckets"]) == ["low", "high", "empty"]  # the declared order, empty buckets included
    assert sums["buckets"] == {"low": {"problems": 4, "correct": 2}, "high": {"problems": 7, "correct": 4}, "empty": {"problems": 0, "correct": 0}}
    for key in ("problems", "correct"):
        assert sum(b[key] for b in sums["buckets"].values()) == sums[key]
    # two ranks' stripes summed (what the all-reduce does) equal one process's sums
    halves = [evaluate_categorical(model, TOK, task, list(range(11))[r::2], batch_size=4)[0] for r in (0, 1)]
    assert add_sums(*halves) == sums
    with pytest.raises(NanochatError, match="problem 3 has bucket 'odd', not one of the task's declared buckets low, high, empty"):
        evaluate_categorical(model, TOK, type("Odd", (BucketMCTask,), {"get_example": lambda self, i: self.items[i] | {"bucket": "odd"}})(), [3])


def test_evaluate_task_reports_buckets_with_wilson_intervals():
    r = evaluate_task(LetterModel(TOK.vocab_size), TOK, "MC", BucketMCTask(), batch_size=3)
    b = r["buckets"]
    assert list(b) == ["low", "high", "empty"] and "coverage" not in r
    assert b["low"]["problems"] == 4 and b["low"]["accuracy"] == 0.5 and b["high"]["accuracy"] == pytest.approx(4 / 7)
    # Wilson by hand, z = 1.96: 2 of 4 -> centre (0.5 + z^2/8) / (1 + z^2/4) = 0.5, half-width
    # z sqrt(1/16 + z^2/64) / (1 + z^2/4) = 0.34996; 4 of 7 -> centre 0.54612, half-width 0.29566
    assert b["low"]["ci95"] == [pytest.approx(0.15004, abs=1e-5), pytest.approx(0.84996, abs=1e-5)]
    assert b["high"]["ci95"] == [pytest.approx(0.25046, abs=1e-5), pytest.approx(0.84178, abs=1e-5)]
    assert b["empty"] == {"problems": 0, "accuracy": None, "ci95": None}
    lo, hi = r["ci95"]  # the whole task: 6 of 11
    assert lo < 6 / 11 < hi and hi - lo < b["low"]["ci95"][1] - b["low"]["ci95"][0]
    # every problem's verdict, with its bucket: they add up to the accuracies
    pp = r["per_problem"]
    assert pp["index"] == list(range(11)) and r["task_size"] == 11 and set(pp["score"]) == {0.0, 1.0}
    assert pp["bucket"] == [BucketMCTask()[i]["bucket"] for i in range(11)]
    for name in ("low", "high"):
        scores = [s for s, bucket in zip(pp["score"], pp["bucket"]) if bucket == name]
        assert sum(scores) / len(scores) == pytest.approx(b[name]["accuracy"])
    # a task without buckets has none
    plain = evaluate_task(LetterModel(TOK.vocab_size), TOK, "MC", MCTask(), batch_size=3, max_problems=5, seed=1)
    assert "buckets" not in plain and "bucket" not in plain["per_problem"]
    assert plain["per_problem"]["index"] == sorted(select_problems(11, 5, 1)) and sum(plain["per_problem"]["score"]) / 5 == pytest.approx(plain["accuracy"])


class BucketCountTask(CountTask):
    """CountTask with buckets "small" (problems 0-3) and "large" (4-7), and a coverage: 1.0 for a
    right sample, 0.5 for a wrong one."""

    buckets = ("small", "large")

    def get_example(self, index):
        return super().get_example(index) | {"bucket": "small" if index < 4 else "large"}

    def score(self, conversation, completion):
        return {"coverage": 1.0 if self.evaluate(conversation, completion) else 0.5}


def count_reply(n):
    def reply(prompt, sample, seed):
        i = int(prompt.split("count ")[1][0])
        return f"#### {i}" if sample < i % (n + 1) else "#### -1"  # problem i: i mod 5 correct samples of n (capped)
    return reply


def test_generative_bucket_pass_at_1_and_coverage(monkeypatch):
    # 4 samples; right samples per problem 0..7: 0 1 2 3 (4: the judge raises) 0 1 2
    engine, task = ScriptedEngine(count_reply(4)), BucketCountTask()
    sums, _ = evaluate_generative(engine, TOK, task, list(range(8)), num_samples=4, max_new_tokens=16, temperature=0.7, batch_size=3)
    small, large = sums["buckets"]["small"], sums["buckets"]["large"]
    assert small["problems"] == 4 and small["pass@1"] == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert large["problems"] == 4 and large["pass@1"] == pytest.approx((0 + 0 + 1 + 2) / 4)
    assert small["pass@1"] + large["pass@1"] == pytest.approx(sums["pass@1"])
    # coverage: problem 4's samples failed in the judge and have none
    assert (small["coverage_samples"], large["coverage_samples"], sums["coverage_samples"]) == (16, 12, 28)
    assert small["coverage"] == pytest.approx(6 + 10 * 0.5) and large["coverage"] == pytest.approx(3 + 9 * 0.5)
    assert sums["coverage"] == pytest.approx(small["coverage"] + large["coverage"])

    monkeypatch.setattr("nanochat.engine.Engine", lambda model, tokenizer: engine)
    r = evaluate_task(engine.model, TOK, "Count", task, num_samples=4, temperature=0.7)
    assert r["accuracy"] == pytest.approx(2.25 / 8) and r["coverage"] == pytest.approx(18.5 / 28)
    assert r["buckets"]["small"]["accuracy"] == pytest.approx(0.375) and r["buckets"]["small"]["coverage"] == pytest.approx(11 / 16)
    assert r["buckets"]["large"]["accuracy"] == pytest.approx(0.1875) and r["buckets"]["large"]["coverage"] == pytest.approx(0.625)
    assert r["per_problem"]["score"] == [0.0, 0.25, 0.5, 0.75, 0.0, 0.0, 0.25, 0.5]  # pass@1 of each problem (4: the judge raised)
    assert r["per_problem"]["bucket"] == ["small"] * 4 + ["large"] * 4
    # pass@1 of 4 samples as the proportion on 4 problems (the documented approximation)
    assert r["buckets"]["small"]["ci95"] == [pytest.approx(0.09190, abs=1e-5), pytest.approx(0.78057, abs=1e-5)]


def test_multihop_buckets_and_coverage_through_the_loop():
    assert MultiHop.buckets == MULTIHOP_BUCKETS
    task = MultiHop(split="test", size=30)
    by_prompt = {TOK.decode(TOK.render_for_completion(task[i])): task[i] for i in range(len(task))}

    def reply(prompt, sample, seed):  # easy: all right; medium: right answer, no trace; hard: right trace, wrong answer
        c = by_prompt[prompt]
        trace = "\n".join(c["path"]) + "\n"
        return {"easy": trace + f"ANSWER: {c['answer']}", "medium": f"ANSWER: {c['answer']}", "hard": trace + "ANSWER: Nobody"}[c["bucket"]]

    sums, _ = evaluate_generative(ScriptedEngine(reply), TOK, task, list(range(len(task))), max_new_tokens=64)
    buckets = sums["buckets"]
    assert list(buckets) == ["easy", "medium", "hard"] and all(b["problems"] > 0 for b in buckets.values())
    assert sum(b["problems"] for b in buckets.values()) == 30
    assert buckets["easy"]["pass@1"] == buckets["easy"]["problems"] and buckets["easy"]["coverage"] == buckets["easy"]["coverage_samples"]
    assert buckets["medium"]["pass@1"] == buckets["medium"]["problems"] and buckets["medium"]["coverage"] == 0
    assert buckets["hard"]["pass@1"] == 0 and buckets["hard"]["coverage"] == buckets["hard"]["coverage_samples"]
    assert sums["pass@1"] == buckets["easy"]["problems"] + buckets["medium"]["problems"]


def test_bucket_table_rows_and_the_report_table():
    mc = {"task": "MC", "eval_type": "categorical", "problems": 11, "accuracy": 6 / 11, "ci95": [0.28, 0.79], "chance": 0.25, "centered": 0.4, "time_s": 1.0,
          "buckets": {"low": {"problems": 4, "accuracy": 0.5, "ci95": [0.15004, 0.84996]}, "empty": {"problems": 0, "accuracy": None, "ci95": None}}}
    hop = {"task": "MultiHop", "eval_type": "generative", "problems": 2, "accuracy": 0.5, "ci95": [0.1, 0.9], "chance": 0.0, "centered": 0.5, "time_s": 1.0, "coverage": 0.75,
           "buckets": {"easy": {"problems": 2, "accuracy": 0.5, "ci95": [0.1, 0.9], "coverage": 0.75}}}
    plain = {"task": "HumanEval", "eval_type": "generative", "problems": 3, "accuracy": 0.0, "chance": 0.0, "centered": 0.0, "time_s": 1.0}
    assert bucket_table([plain]) == ""
    assert bucket_table([mc, plain, hop]).splitlines() == [
        "| task | bucket | n | accuracy | 95% interval | coverage |",
        "|---|---|---|---|---|---|",
        "| MC | low | 4 | 0.5000 | [0.1500, 0.8500] | - |",
        "| MC | empty | 0 | - | - | - |",
        "| MC | all | 11 | 0.5455 | [0.2800, 0.7900] | - |",
        "| MultiHop | easy | 2 | 0.5000 | [0.1000, 0.9000] | 0.7500 |",
        "| MultiHop | all | 2 | 0.5000 | [0.1000, 0.9000] | 0.7500 |",
    ]
    assert bucket_table([mc]).splitlines()[0] == "| task | bucket | n | accuracy | 95% interval |"
    # after the main table and the ChatCORE line; a task outside the suite does not change ChatCORE's scope
    suite = [dict(plain, task=name) for name in CHAT_TASKS]
    table = format_table(suite + [hop], 0.0, CHAT_TASKS)
    assert "ChatCORE 0.0000 (mean centred score over all 6 tasks)\n\n| task | bucket |" in table
    assert table.endswith("| MultiHop | all | 2 | 0.5000 | [0.1000, 0.9000] | 0.7500 |")


# ------------------------------------------------------------------------------------------------ paired comparison


def scored(scores, buckets=None, task="T", size=None, index=None):
    """An evaluate_task-like result with per-problem scores (buckets: one name per problem)."""
    index = list(range(len(scores))) if index is None else index
    r = {"task": task, "task_size": size or 100, "per_problem": {"index": index, "score": scores}}
    if buckets is not None:
        r["per_problem"]["bucket"] = buckets
        r["buckets"] = dict.fromkeys(["easy", "hard", "empty"])
    return r


def test_paired_difference_by_hand():
    before = [1, 0, 0, 1, 1, 0, 0, 0, 1, 0]
    after = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    buckets = ["easy"] * 4 + ["hard"] * 6
    rows = paired_difference(scored(before, buckets), scored(after, buckets))
    assert [r["bucket"] for r in rows] == ["easy", "hard", "all"]  # the task's order; an empty bucket is left out
    easy, hard, everything = rows
    # easy: differences 0 1 0 0 -> mean 0.25, s = 0.5, half-width 1.96 * 0.5 / 2
    assert easy["problems"] == 4 and easy["before"] == 0.5 and easy["after"] == 0.75 and easy["diff"] == 0.25
    assert easy["ci95"] == [pytest.approx(0.25 - 0.4899910), pytest.approx(0.25 + 0.4899910)]
    assert (easy["fixed"], easy["broke"]) == (1, 0)
    # hard: differences -1 1 1 0 0 1 -> mean 1/3
    d = [-1, 1, 1, 0, 0, 1]
    m = sum(d) / 6
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 5)
    assert hard["diff"] == pytest.approx(m) and hard["ci95"] == [pytest.approx(m - 1.959964 * s / math.sqrt(6)), pytest.approx(m + 1.959964 * s / math.sqrt(6))]
    assert (hard["fixed"], hard["broke"]) == (3, 1)
    assert everything["problems"] == 10 and everything["diff"] == pytest.approx(0.3) and (everything["fixed"], everything["broke"]) == (4, 1)
    d = [a - b for a, b in zip(after, before)]
    half = 1.959964 * math.sqrt(sum((x - 0.3) ** 2 for x in d) / 9) / math.sqrt(10)
    assert everything["ci95"] == [pytest.approx(0.3 - half), pytest.approx(0.3 + half)]


def test_paired_difference_matches_problems_by_index():
    # before scored problems 0-5, after 3-8 (another --max-problems subset): compared on 3, 4, 5 only
    before = scored([0.0, 0.0, 0.0, 0.0, 1.0, 0.5], index=[0, 1, 2, 3, 4, 5])
    after = scored([0.5, 1.0, 1.0, 1.0, 1.0, 1.0], index=[3, 4, 5, 6, 7, 8])
    (row,) = paired_difference(before, after)
    assert row["bucket"] == "all" and row["problems"] == 3 and row["diff"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert (row["fixed"], row["broke"]) == (2, 0)
    (single,) = paired_difference(scored([0.0], index=[7]), scored([1.0], index=[7]))
    assert single["problems"] == 1 and single["ci95"] is None
    table = paired_table("sft", "rsft", "T", [row]).splitlines()
    assert table[0] == "| task | bucket | n | sft | rsft | difference | 95% interval | fixed / broke |"
    assert table[2].startswith("| T | all | 3 | 0.5000 | 0.8333 | +0.3333 | [") and table[2].endswith("| 2 / 0 |")


def test_paired_difference_refuses_what_cannot_be_paired():
    with pytest.raises(NanochatError, match="no per-problem scores"):
        paired_difference({"task": "T"}, scored([1.0]))
    with pytest.raises(NanochatError, match="not the same problems"):
        paired_difference(scored([1.0], size=1000), scored([1.0], size=2000))
    with pytest.raises(NanochatError, match="not the same problems"):
        paired_difference(scored([1.0], task="A"), scored([1.0], task="B"))
    with pytest.raises(NanochatError, match="no problem was evaluated by both"):
        paired_difference(scored([1.0], index=[0]), scored([1.0], index=[1]))


def test_a_saved_evaluation_decoded_otherwise_is_refused(tmp_path, monkeypatch):
    """--paired-with: a greedy accuracy against a sampled pass@1 (or another length limit) is no comparison;
    another --num-samples at the same temperature is (both estimate pass@1); categorical tasks do not decode."""
    from scripts.chat_eval import load_saved_evaluation, parse_args

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "report").mkdir()
    saved_args = vars(parse_args(["--tasks", "MultiHop,ARC-Easy", "--temperature", "0.7", "--num-samples", "4", "--max-new-tokens", "96"]))
    tasks = {"MultiHop": {"task": "MultiHop", "eval_type": "generative"}, "ARC-Easy": {"task": "ARC-Easy", "eval_type": "categorical"}}
    (tmp_path / "report" / "chat-eval-sft.json").write_text(json.dumps({"args": saved_args, "tasks": tasks}))

    def load(*flags):
        args = parse_args(["--tasks", "MultiHop,ARC-Easy", *flags])
        return load_saved_evaluation("sft", args.tasks, args)

    assert set(load("--temperature", "0.7", "--num-samples", "2", "--max-new-tokens", "96")) == {"MultiHop", "ARC-Easy"}
    with pytest.raises(NanochatError, match=r"--paired-with sft: .*chat-eval-sft.json decoded MultiHop with --temperature 0.7, this run with 0.0"):
        load("--max-new-tokens", "96")
    with pytest.raises(NanochatError, match="--max-new-tokens 96, this run with 64"):
        load("--temperature", "0.7", "--max-new-tokens", "64")
    args = parse_args(["--tasks", "ARC-Easy"])  # categorical only: the decoding flags do not matter
    assert set(load_saved_evaluation("sft", args.tasks, args)) == {"MultiHop", "ARC-Easy"}


# ------------------------------------------------------------------------------------------------ the suite and the layering


def tasks_imports(source):
    """The imports of tasks/ (absolute: `import tasks...`, `from tasks... import`) in Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if name == "tasks" or name.startswith("tasks.")]
    return found


def test_the_library_never_imports_tasks():
    # the checker sees every form, at any depth (a function-local import included)
    source = "import tasks.arc\nfrom tasks import recipe\ndef f():\n    from tasks.common import Task"
    assert tasks_imports(source) == ["1: tasks.arc", "2: tasks", "4: tasks.common"]
    assert tasks_imports("import tasksx\nfrom nanochat.tasks_util import y\nfrom .tasks import z") == []
    paths = sorted(Path(REPO, "nanochat").rglob("*.py"))
    assert len(paths) > 10
    offenders = {str(p.relative_to(REPO)): found for p in paths if (found := tasks_imports(p.read_text(encoding="utf-8")))}
    assert offenders == {}, "the library takes task objects; registries live in tasks/recipe.py"


def test_chat_suite_and_its_table_line():
    assert CHAT_TASKS == ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
    with pytest.raises(NanochatError, match="unknown chat task 'Nope'; expected one of ARC-Easy, ARC-Challenge, MMLU"):
        load_chat_task("Nope")
    r = {"task": "GSM8K", "eval_type": "generative", "problems": 2, "accuracy": 0.5, "chance": 0.0, "centered": 0.5, "time_s": 1.0}
    assert "ChatCORE 0.5000 (mean centred score over 1 of the 6 tasks: not comparable" in format_table([r], 0.5, CHAT_TASKS)
    results = [dict(r, task=name) for name in CHAT_TASKS]
    assert format_table(results, 0.5, CHAT_TASKS).endswith("ChatCORE 0.5000 (mean centred score over all 6 tasks)")
    assert "ChatCORE" not in format_table(results, None, CHAT_TASKS)
    # MultiHop is evaluated on request, outside ChatCORE, and needs no data files
    assert EVAL_TASKS == CHAT_TASKS + ("MultiHop",)
    task = load_chat_task("MultiHop", "/nonexistent/tasks")
    assert isinstance(task, MultiHop) and task.split == "test" and len(task) == 1000 and task.eval_type == "generative"


@needs_tasks
def test_load_chat_task_gives_each_evaluation_split(monkeypatch):
    for var in ("NANOCHAT_DATA_ROOT", "NANOCHAT_WORDS_FILE"):  # the word list: the tasks dir's sibling
        monkeypatch.delenv(var, raising=False)
    sizes = {"ARC-Easy": 2376, "ARC-Challenge": 1172, "MMLU": 14042, "GSM8K": 1319, "HumanEval": 164, "SpellingBee": 256}
    for name in CHAT_TASKS:
        task = load_chat_task(name, os.path.join(SHARED_DATA, "tasks"))
        assert len(task) == sizes[name], name
        assert task.eval_type == ("categorical" if name in ("ARC-Easy", "ARC-Challenge", "MMLU") else "generative"), name
