"""
RSFT as its own stage and GRPO on any verifiable task (scripts/chat_rsft.py, scripts/chat_rl.py,
nanochat/rl.py, nanochat/distribution.py): the distribution report (TVD and its noise against
simulation, a warning on a mismatched prompt set and none on a matched one), prompt pools and
prompts files checked against the verifier, the samples file (every scored sample, winners and
losers, exact on resume), and a GRPO and an RSFT run of one MultiHop recipe side by side in the
lab's compare. The tiny random SFT GPT and the byte tokenizer: tests/helpers/rl_util.py.
"""

import json
import os

import numpy as np
import pytest

from conftest import byte_tokenizer
from helpers.rl_util import link_sft, make_sft_base, run_main
from helpers.scripts_util import read_metrics
from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.common import NanochatError
from nanochat.distribution import WARN_BUCKET_TVD, distribution_report, tvd, tvd_noise
from nanochat.rl import PromptPool, check_prompts, reward_trend, step_prompts
from tasks.common import validate_conversation
from tasks.multihop import MultiHop

TOK = byte_tokenizer()


# ------------------------------------------------------------------------------------------------ the distribution report


def test_tvd_and_its_noise_against_simulation():
    assert tvd([1.0, 0.0, 0.0], [0.4, 0.2, 0.4]) == pytest.approx(0.6)
    assert tvd([0.3, 0.7], [0.3, 0.7]) == 0.0
    # two samples of one mix: the mean TVD of many simulated pairs is what tvd_noise predicts
    rng = np.random.default_rng(0)
    mix, n_p, n_q = np.array([0.4, 0.2, 0.3, 0.1]), 400, 150
    simulated = np.mean([tvd(rng.multinomial(n_p, mix) / n_p, rng.multinomial(n_q, mix) / n_q) for _ in range(4000)])
    assert tvd_noise(mix, mix, n_p, n_q) == pytest.approx(simulated, rel=0.1)


def test_distribution_report_warns_on_a_mismatched_prompt_set_and_not_on_a_matched_one():
    evaluation = MultiHop("test", size=300)  # all buckets: hops 1-5 uniform, easy 40%, medium 20%, hard 40%
    easy = PromptPool(MultiHop("train", size=600), ["easy"], MultiHop.buckets)
    report = distribution_report(easy, evaluation, TOK, MultiHop.buckets)
    shares = report["buckets"]
    assert list(shares) == ["easy", "medium", "hard"] and shares["easy"][0] == 1.0 and shares["hard"][0] == 0.0
    assert report["bucket_tvd"] == pytest.approx(1.0 - shares["easy"][1]) and report["bucket_tvd"] > WARN_BUCKET_TVD
    assert report["length_tvd"] == pytest.approx(tvd(*zip(*report["lengths"].values())))
    assert any(line.startswith("WARNING: the train prompts' bucket mix") for line in report["warnings"])
    assert "| easy | 100.0% |" in report["text"] and report["text"].count("WARNING") == len(report["warnings"])
    # the same mix (another split of the same generator): quiet, and both distances within a few noise levels
    matched = distribution_report(MultiHop("train", size=600), evaluation, TOK, MultiHop.buckets)
    assert matched["warnings"] == [] and "WARNING" not in matched["text"]
    assert matched["bucket_tvd"] < 3 * matched["bucket_noise"] and matched["length_tvd"] < 3 * matched["length_noise"]
    # conversations without buckets: no bucket distance, the lengths are still compared
    plain = [{"messages": [{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "y"}]} for n in (10, 200)]
    bare = distribution_report(plain, plain[:1], TOK)
    assert bare["bucket_tvd"] is None and bare["length_tvd"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_pool_filters_buckets_and_the_steps_split_over_ranks():
    source = MultiHop("train", size=60)
    pool = PromptPool(source, ["easy", "hard"], MultiHop.buckets)
    assert pool.indices == [i for i in range(60) if source[i]["bucket"] != "medium"]
    assert all(pool[j] == source[i] for j, i in enumerate(pool.indices))
    assert len(PromptPool(source)) == 60
    with pytest.raises(NanochatError, match="--buckets tricky: not a bucket of MultiHop train"):
        PromptPool(source, ["tricky"], MultiHop.buckets, "MultiHop train")
    with pytest.raises(NanochatError, match="no prompts in .* in the buckets hard"):
        PromptPool([source[i] for i in range(60) if source[i]["bucket"] == "easy"], ["hard"], MultiHop.buckets)
    # --max-prompts: a seeded subset of the bucket-filtered prompts, in source order; all of them when it asks for more
    few = PromptPool(source, ["easy", "hard"], MultiHop.buckets, max_prompts=10, seed=3)
    assert len(few) == 10 and few.indices == sorted(few.indices) and set(few.indices) <= set(pool.indices)
    assert few.indices == PromptPool(source, ["easy", "hard"], MultiHop.buckets, max_prompts=10, seed=3).indices
    assert few.indices != PromptPool(source, ["easy", "hard"], MultiHop.buckets, max_prompts=10, seed=4).indices
    assert PromptPool(source, max_prompts=-1).indices == PromptPool(source, max_prompts=600).indices == list(range(60))
    # the prompts of a step do not depend on the number of ranks
    order = list(np.random.default_rng(0).permutation(len(pool)))
    one = step_prompts(order, 3, 4, seed=7)
    two = sorted(step_prompts(order, 3, 4, 7, rank=0, world_size=2) + step_prompts(order, 3, 4, 7, rank=1, world_size=2))
    assert one == two and [j for j, _, _ in one] == [0, 1, 2, 3] and len({s for _, _, s in one}) == 4


def test_prompts_file_is_validated_and_checked_against_the_verifier(tmp_path):
    from scripts.chat_rsft import read_prompts

    verifier = MultiHop("train")
    conversations = [MultiHop("val", size=4)[i] for i in range(4)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in conversations) + "\n\n")
    prompts = read_prompts(str(path))
    assert prompts == conversations  # the metadata the verifier reads is kept
    check_prompts(prompts, verifier, "MultiHop", str(path))
    no_path = [dict(conversations[0]), {k: v for k, v in conversations[1].items() if k != "path"}]
    with pytest.raises(NanochatError, match=r"prompts.jsonl: prompt 2: the MultiHop verifier cannot judge it \(KeyError"):
        check_prompts(no_path, verifier, "MultiHop", str(path))
    wrong = [conversations[0] | {"answer": "Nobody"}]
    with pytest.raises(NanochatError, match="prompt 1: the MultiHop verifier does not accept its own reference reply"):
        check_prompts(wrong, verifier, "MultiHop", str(path))
    path.write_text(json.dumps({"messages": conversations[0]["messages"][:1]}) + "\n")
    with pytest.raises(NanochatError, match=r"prompts.jsonl:1: the last message must be from the assistant"):
        read_prompts(str(path))


# ------------------------------------------------------------------------------------------------ the stages end to end on MultiHop

ARGS = ["--task", "MultiHop", "--questions-per-step", 2, "--num-samples", 4, "--max-new-tokens", 12, "--eval-every", -1,
        "--eval-problems", 4, "--eval-samples", 2, "--device-batch-size", 4, "--num-iterations", 2]
SAMPLE_KEYS = {"step", "question", "sample", "reward", "correct", "coverage", "bucket", "kept", "messages"}


def parity_score(self, conversation, completion):
    """MultiHop's verifier replaced: correct when the completion has an even length, coverage its
    length mod 3 over 2, so that a random model gets winners and losers."""
    return {"correct": len(completion) % 2 == 0, "coverage": (len(completion) % 3) / 2, "bucket": conversation["bucket"], "hops": conversation["hops"]}


@pytest.fixture(scope="module")
def mh_env(tmp_path_factory):
    return make_sft_base(tmp_path_factory.mktemp("rsft") / "base")


def stage(env, monkeypatch, script, tag, *args):
    from scripts import chat_rl, chat_rsft

    link_sft(env["NANOCHAT_BASE_DIR"], tag)
    run_main({"chat_rl": chat_rl, "chat_rsft": chat_rsft}[script].main, ARGS + ["--model-tag", tag, *args], env, monkeypatch)


def run_files(env, stage_name, tag):
    run_dir = os.path.join(checkpoint_dir(stage_name, tag, env["NANOCHAT_BASE_DIR"]), "run")
    samples = os.path.join(run_dir, "rsft_samples.jsonl")
    return read_metrics(os.path.join(run_dir, "metrics.jsonl")), read_metrics(samples) if os.path.exists(samples) else None


def test_rsft_samples_file_holds_winners_and_losers_and_is_exact_on_resume(mh_env, monkeypatch):
    monkeypatch.setattr(MultiHop, "score", parity_score)
    stage(mh_env, monkeypatch, "chat_rsft", "full")
    rows, samples = run_files(mh_env, "rsft", "full")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and len(samples) == 2 * 2 * 4  # every scored sample: steps x prompts x K
    plain = 0
    for s in samples:
        assert set(s) == SAMPLE_KEYS and s["kept"] == s["correct"] and s["reward"] == float(s["correct"]) and s["bucket"] in MultiHop.buckets
        parts = validate_conversation(s, "sample")["messages"][-1]["content"]
        if len(parts) == 1:  # no special token sampled: the written text is the judged one (else tool markers split it)
            plain += 1
            text = parts[0]["text"]
            assert s["correct"] == (len(text) % 2 == 0) and s["coverage"] == (len(text) % 3) / 2  # the verdict is this sample's
        assert MultiHop("train")[s["question"]]["messages"][0] == s["messages"][0]  # question: the prompt's index in the split
    assert plain >= 4
    assert any(s["kept"] for s in samples) and not all(s["kept"] for s in samples)
    for r in steps:  # the step log agrees with the file
        mine = [s for s in samples if s["step"] == r["step"]]
        assert r["kept"] == sum(s["kept"] for s in mine) and r["train_pass@1"] == pytest.approx(r["kept"] / 8)
        assert r["coverage"] == pytest.approx(np.mean([s["coverage"] for s in mine]))
        assert r["kept_coverage"] == pytest.approx(np.mean([s["coverage"] for s in mine if s["kept"]]))
        assert r["skipped"] is False
    # stopped after step 1 and resumed: the same file and the same steps as the uninterrupted run
    with pytest.raises(SystemExit) as stop:
        stage(mh_env, monkeypatch, "chat_rsft", "cut", "--stop-at-step", 1)
    assert stop.value.code == 143
    run_main(__import__("scripts.chat_rsft", fromlist=["main"]).main, ARGS + ["--model-tag", "cut", "--resume"], mh_env, monkeypatch)
    cut_rows, cut_samples = run_files(mh_env, "rsft", "cut")
    assert cut_samples == samples
    for a, b in zip(steps, [r for r in cut_rows if "reward" in r]):
        assert a["samples_sha"] == b["samples_sha"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    # a resume with other prompts is refused
    with pytest.raises(NanochatError, match="--resume: .* was trained with --buckets None, not \\['easy'\\]"):
        run_main(__import__("scripts.chat_rsft", fromlist=["main"]).main, ARGS + ["--model-tag", "cut", "--resume", "--buckets", "easy"], mh_env, monkeypatch)


def test_max_prompts_revisits_the_same_prompts_and_is_checked_on_resume(mh_env, monkeypatch):
    """--max-prompts 2 with 2 prompts a step: every step samples the same two prompts (the samples
    file names each sample's prompt), with fresh seeds; each step logs its prompts' mean rewards,
    which reward_trend pairs from first visit to last; a resume with another --max-prompts is refused."""
    monkeypatch.setattr(MultiHop, "score", parity_score)
    stage(mh_env, monkeypatch, "chat_rsft", "pool2", "--max-prompts", 2, "--num-iterations", 4)
    _, samples = run_files(mh_env, "rsft", "pool2")
    questions = [sorted({s["question"] for s in samples if s["step"] == step}) for step in (1, 2, 3, 4)]
    assert all(q == questions[0] for q in questions) and len(questions[0]) == 2
    by_step = [[s["messages"][-1] for s in samples if s["step"] == step] for step in (1, 2, 3, 4)]
    assert by_step[0] != by_step[1]  # the same prompts, sampled afresh
    # each step logs its prompts' mean rewards, which the reward trend pairs across visits
    rows = [r for r in run_files(mh_env, "rsft", "pool2")[0] if "reward" in r]
    for r in rows:
        assert sorted(q for q, _ in r["prompt_rewards"]) == questions[0]
        for q, reward in r["prompt_rewards"]:
            assert reward == pytest.approx(np.mean([s["reward"] for s in samples if s["step"] == r["step"] and s["question"] == q]))
    trend = reward_trend(os.path.join(checkpoint_dir("rsft", "pool2", mh_env["NANOCHAT_BASE_DIR"]), "run", "metrics.jsonl"))
    first = dict(rows[0]["prompt_rewards"])
    last = dict(rows[-1]["prompt_rewards"])
    assert trend["revisit_prompts"] == 2 and trend["revisit_rise"] == pytest.approx(np.mean([last[q] - first[q] for q in first]))
    with pytest.raises(NanochatError, match="--resume: .* was trained with --max-prompts 2, not 3"):
        run_main(__import__("scripts.chat_rsft", fromlist=["main"]).main, ARGS + ["--model-tag", "pool2", "--resume", "--max-prompts", 3], mh_env, monkeypatch)
    with pytest.raises(NanochatError, match="--max-prompts 0 is out of range"):
        stage(mh_env, monkeypatch, "chat_rl", "pool0", "--max-prompts", 0)


def test_grpo_and_rsft_of_one_recipe_side_by_side(mh_env, monkeypatch, capsys):
    from scripts import lab

    monkeypatch.setattr(MultiHop, "score", parity_score)
    evaluation = ["--eval-problems", 100]  # enough problems that the report's noise (~0.06) is well under its thresholds
    stage(mh_env, monkeypatch, "chat_rl", "grpo", "--name", "mh-grpo", *evaluation)
    out = capsys.readouterr().out
    assert "bucket TVD" in out and "WARNING" not in out  # MultiHop train vs test: the same mix
    assert "| MultiHop | easy |" in out and "| MultiHop | all |" in out  # the evaluation per bucket, with coverage
    stage(mh_env, monkeypatch, "chat_rsft", "rsft", "--name", "mh-rsft", "--buckets", "easy", *evaluation)
    out = capsys.readouterr().out
    assert "WARNING: the training prompts' bucket mix is far from the evaluation set's" in out  # easy prompts, all-bucket evaluation
    rows, samples = run_files(mh_env, "rsft", "rsft")
    assert {s["bucket"] for s in samples} == {"easy"}
    grpo_rows, _ = run_files(mh_env, "rl", "grpo")
    for r in [r for r in grpo_rows if "reward" in r]:  # GRPO logs the task's coverage too
        assert 0 <= r["coverage"] <= 1 and "kept" not in r
    # the lab's compare puts the two runs of different stages side by side, on the same evaluation
    lab.main(["compare", "mh-grpo", "mh-rsft", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["stage"]) for r in result["runs"]] == [("mh-grpo", "rl"), ("mh-rsft", "rsft")]
    table = {row["metric"]: row["cells"] for row in result["rows"]}
    for metric in ("final eval_pass@1", "final eval_pass@2", "final eval_coverage"):
        last = [[r for r in rs if metric.removeprefix("final ") in r][-1] for rs in (grpo_rows, rows)]
        assert [c["value"] for c in table[metric]] == pytest.approx([r[metric.removeprefix("final ")] for r in last])
    lab.main(["compare", "mh-grpo", "mh-rsft"])
    text = capsys.readouterr().out
    assert "| metric | mh-grpo | mh-rsft | winner |" in text and "| final eval_coverage |" in text


def test_grpo_coverage_reward_adds_the_path_coverage(mh_env, monkeypatch):
    """--coverage-reward 0.5: each sample's reward is its answer's (0/1) plus half its coverage, so
    a step's mean reward is train_pass@1 + 0.5 x the mean coverage; train_pass@1 stays the answer's."""
    monkeypatch.setattr(MultiHop, "score", parity_score)
    stage(mh_env, monkeypatch, "chat_rl", "grpo-cov", "--coverage-reward", 0.5)
    rows, _ = run_files(mh_env, "rl", "grpo-cov")
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 2 and any(r["coverage"] > 0 for r in steps)
    for r in steps:
        assert r["reward"] == pytest.approx(r["train_pass@1"] + 0.5 * r["coverage"], abs=1e-6)


def first_byte_score(self, conversation, completion):
    """A reward a tiny random model can learn in a few steps: the completion starts with a byte
    below 128 (about half of the first tokens of a random model)."""
    return {"correct": bool(completion) and ord(completion[0]) < 128, "coverage": 0.0, "bucket": conversation["bucket"], "hops": conversation["hops"]}


def test_grpo_raises_a_learnable_reward(mh_env, monkeypatch):
    """The machinery end to end (sampling, scoring, advantages, the policy-gradient loss and its
    sign, the optimizer): a reward that depends on the first sampled token only rises within a
    few steps. A wrong sign or a target shifted by one token fails it."""
    monkeypatch.setattr(MultiHop, "score", first_byte_score)
    stage(mh_env, monkeypatch, "chat_rl", "learnable", "--num-iterations", 12, "--questions-per-step", 8, "--num-samples", 8,
          "--max-new-tokens", 2, "--device-batch-size", 64, "--init-lr-frac", 1.0, "--warmdown-ratio", 0.0, "--temperature", 1.0, "--top-k", 0)
    rows, _ = run_files(mh_env, "rl", "learnable")
    reward = [r["reward"] for r in rows if "reward" in r]
    assert len(reward) == 12
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.2, reward
