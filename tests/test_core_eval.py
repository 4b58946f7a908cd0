"""
CORE (nanochat/core_eval.py, scripts/base_eval.py): prompt construction, scoring of each task type
by a hand-made bigram "model" whose preferences fix the expected accuracies exactly, centring,
missing tasks, the batched scorer against unbatched forward passes of a real GPT, 2 ranks vs 1,
and base_eval end to end on a tiny checkpoint with the real CORE data.
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import byte_tokenizer
from helpers.scripts_util import SHARED_DATA, make_env, run_script
from torch import nn

from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
from nanochat.common import NanochatError
from nanochat.core_eval import (
    CoreTask,
    centered_accuracy,
    evaluate_core,
    fewshot_indices,
    format_core_table,
    get_eval_dir,
    load_items,
    load_task_table,
    render_prompt,
    score_rows,
    select_items,
    shared_prefix_len,
    tokenize_prompt,
)
from nanochat.gpt import GPT, GPTConfig

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CORE_DATA = os.path.join(SHARED_DATA, "eval", "core")
V = 256 + 9  # byte tokenizer: 256 bytes + the special tokens
HEADER = "label\tfile\ttask_type\tnum_fewshot\tcontinuation_delimiter\trandom_baseline_v1\trandom_baseline_v2\n"


class BigramModel(nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next-token preferences depend on the last token only,
    so which continuation wins is known by construction. Has the interface the scorer uses (a
    kv_cache argument, the config fields and lm_head that engine.KVCache.for_model reads; the
    bigram needs no cache). Records the shape of every forward pass."""

    def __init__(self, table, sequence_len=512):
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(sequence_len=sequence_len, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.lm_head = nn.Linear(2, 1, bias=False)
        self.calls = []

    def get_compute_dtype(self, device):
        return torch.float32

    def forward(self, idx, kv_cache=None):
        self.calls.append(tuple(idx.shape))
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return self.table[idx]


def preference_table():
    t = torch.zeros(V, V)
    t[:, ord("a")] = 3.0  # after any token 'a' is the most likely next token ...
    t[ord(":"), ord(" ")] = 5.0  # ... except after ':' where it is ' '
    t[ord("1"), ord(" ")] = 5.0  # and ' ' is likelier after '1' than after anything but ':'
    return t


# Hand-made items. With preference_table(): a choice's mean loss falls with its share of 'a's;
# a schema option ending in '1' wins; a language-modelling item is right iff its context ends in
# ':' and its continuation is all 'a'.
MC_ITEMS = [
    {"query": "Question: x?", "choices": ["bb", "aa", "ab"], "gold": 1},  # right
    {"query": "Question: y?", "choices": ["aa", "bb"], "gold": 0},  # right
    {"query": "Question: z?", "choices": ["ba", "aa", "bb", "ab"], "gold": 1},  # right
    {"query": "Question: w?", "choices": ["aa", "bb"], "gold": 1},  # wrong
    # right only with the MEAN loss: " b" has the lower sum, " baaaaaaaa" the lower mean
    {"query": "Question: v?", "choices": ["b", "baaaaaaaa"], "gold": 1},
]
SCHEMA_ITEMS = [
    {"context_options": ["x1", "x2"], "continuation": "zz", "gold": 0},  # right
    {"context_options": ["y2", "y1"], "continuation": "zz", "gold": 1},  # right
    {"context_options": ["w1", "w2"], "continuation": "zz", "gold": 1},  # wrong
    {"context_options": ["v2", "v1", "u2"], "continuation": "zz", "gold": 1},  # right
]
LM_ITEMS = [
    {"context": "q:", "continuation": "aaa"},  # right
    {"context": "q:", "continuation": "aab"},  # wrong: the last token
    {"context": "q.", "continuation": "aaa"},  # wrong: the first token (the space)
    {"context": "r:", "continuation": "a"},  # right
]
EXPECTED = {"mc": 4 / 5, "schema": 3 / 4, "lm": 2 / 4}


def write_jsonl(path, items):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)


def write_eval_dir(root, with_missing=True):
    """An eval dir with the three hand-made tasks (+ a task whose file does not exist)."""
    rows = [
        ("mc", "a/mc.jsonl", "multiple_choice", 2, "\nAnswer: ", 0.25, 0.4),
        ("schema", "b/schema.jsonl", "schema", 1, " ", 0.5, 0.5),
        ("lm", "b/lm.jsonl", "language_modeling", 0, " ", 0.0, 0.0),
    ]
    if with_missing:
        rows.append(("gone", "c/gone.jsonl", "multiple_choice", 10, " ", 0.25, 0.25))
    with open(os.path.join(root, "core_tasks.tsv"), "w") as f:
        f.write(HEADER + "".join("\t".join([r[0], r[1], r[2], str(r[3]), json.dumps(r[4]), str(r[5]), str(r[6])]) + "\n" for r in rows))
    write_jsonl(os.path.join(root, "a", "mc.jsonl"), MC_ITEMS)
    write_jsonl(os.path.join(root, "b", "schema.jsonl"), SCHEMA_ITEMS)
    write_jsonl(os.path.join(root, "b", "lm.jsonl"), LM_ITEMS)
    return str(root)


def task(task_type, num_fewshot=0, delimiter=" "):
    return CoreTask("t", "t.jsonl", task_type, num_fewshot, delimiter, 0.25, 0.25)


# ------------------------------------------------------------------------------------------------
# prompts


def test_fewshot_indices_exclude_self_and_are_deterministic():
    for index in range(5):  # 5 items, 4 shots: exactly the other four
        assert sorted(fewshot_indices(5, 4, index)) == [i for i in range(5) if i != index]
    for index in range(0, 200, 7):
        picks = fewshot_indices(200, 10, index)
        assert len(picks) == 10 == len(set(picks)) and index not in picks and all(0 <= p < 200 for p in picks)
        assert picks == fewshot_indices(200, 10, index)  # same seed, same demonstrations
    assert any(fewshot_indices(200, 10, i) != fewshot_indices(200, 10, i, seed=99) for i in range(5))
    assert fewshot_indices(3, 10, 1) in ([0, 2], [2, 0])  # fewer items than shots: all the others
    assert fewshot_indices(1, 10, 0) == [] and fewshot_indices(50, 0, 3) == []


def test_prompt_format_of_each_task_type():
    mc = [{"query": "Q0", "choices": ["A0", "B0"], "gold": 0}, {"query": "Q1", "choices": ["A1", "B1"], "gold": 1}]
    p = render_prompt(task("multiple_choice", 1, "\nAnswer: "), mc, 0)
    assert p.contexts == ["Q1\nAnswer: B1\n\nQ0\nAnswer:"] * 2 and p.continuations == [" A0", " B0"] and p.gold == 0

    schema = [{"context_options": ["o0a", "o0b"], "continuation": "c0", "gold": 1}, {"context_options": ["o1a", "o1b"], "continuation": "c1", "gold": 0}]
    p = render_prompt(task("schema", 1), schema, 0)
    assert p.contexts == ["o1a c1\n\no0a", "o1a c1\n\no0b"] and p.continuations == [" c0", " c0"] and p.gold == 1

    lm = [{"context": "ctx0", "continuation": "x0"}, {"context": "ctx1", "continuation": "x1"}, {"context": "ctx2", "continuation": "x2"}]
    p = render_prompt(task("language_modeling"), lm, 2)
    assert p.contexts == ["ctx2"] and p.continuations == [" x2"] and p.gold == 0
    p = render_prompt(task("language_modeling", 2, "\nA: "), lm, 1)
    shots = fewshot_indices(3, 2, 1)
    assert p.contexts == ["".join(f"ctx{j}\nA: x{j}\n\n" for j in shots) + "ctx1\nA:"]


def test_items_are_stripped_on_load(tmp_path):
    path = str(tmp_path / "mc.jsonl")
    write_jsonl(path, [{"query": "  Q: x? \n", "choices": [" aa ", "bb\n"], "gold": 0}, {"query": "Q2", "choices": ["c", "d"], "gold": 1}])
    items = load_items(path, "multiple_choice")
    assert items[0] == {"query": "Q: x?", "choices": ["aa", "bb"], "gold": 0}
    p = render_prompt(task("multiple_choice", 1, " "), items, 0)
    assert p.contexts == ["Q2 d\n\nQ: x?"] * 2 and p.continuations == [" aa", " bb"]


def test_left_truncation_keeps_bos_and_continuation():
    tok = byte_tokenizer()
    prompt = render_prompt(task("language_modeling"), [{"context": "abcdefghijklmnopqrstuvwxyz", "continuation": "XYZ"}], 0)
    ((ids, start),) = tokenize_prompt(tok, prompt, max_len=10)
    assert len(ids) == 10 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[start:]) == " XYZ" and tok.decode(ids[1:start]) == "vwxyz"
    ((ids, start),) = tokenize_prompt(tok, prompt, max_len=100)  # fits: untouched
    assert tok.decode(ids[1:]) == "abcdefghijklmnopqrstuvwxyz XYZ" and tok.decode(ids[start:]) == " XYZ"
    ((ids, start),) = tokenize_prompt(tok, prompt, max_len=4)  # the continuation alone does not fit
    assert ids == [tok.bos_token_id] + tok.encode("XYZ") and start == 1
    # the rows of one item lose the same context: choices keep a common context
    prompt = render_prompt(task("multiple_choice"), [{"query": "abcdefghij", "choices": ["x", "yyyy"], "gold": 0}], 0)
    (a, sa), (b, sb) = tokenize_prompt(tok, prompt, max_len=10)
    assert len(b) == 10 and len(a) == 7 and a[:sa] == b[:sb] == [tok.bos_token_id] + tok.encode("ghij")


def test_truncated_items_are_still_scored_on_their_continuation(tmp_path):
    root = write_eval_dir(tmp_path, with_missing=False)
    long_lm = [{"context": "w" * 200 + " q:", "continuation": "aaa"}, {"context": "w" * 200 + " q.", "continuation": "aaa"}]
    write_jsonl(os.path.join(root, "b", "lm.jsonl"), long_lm)
    model = BigramModel(preference_table(), sequence_len=16)
    result = evaluate_core(model, byte_tokenizer(), "cpu", eval_dir=root)
    assert result["results"]["lm"]["accuracy"] == 0.5
    assert max(T for _, T in model.calls) == 16


def test_select_items_subset_and_striping():
    assert select_items(10, -1) == list(range(10)) and select_items(10, 50) == list(range(10))
    subset = select_items(100, 9)
    assert len(subset) == 9 == len(set(subset)) and subset == select_items(100, 9)
    ranks = [select_items(100, 9, r, 4) for r in range(4)]
    assert sorted(i for r in ranks for i in r) == subset and sum(map(len, ranks)) == 9


# ------------------------------------------------------------------------------------------------
# scoring


def test_each_task_type_scores_as_designed(tmp_path):
    root = write_eval_dir(tmp_path)
    model = BigramModel(preference_table())
    result = evaluate_core(model, byte_tokenizer(), "cpu", eval_dir=root)
    for label, acc in EXPECTED.items():
        assert result["results"][label]["accuracy"] == pytest.approx(acc, abs=1e-12), label
        assert result["results"][label]["num_items"] == {"mc": 5, "schema": 4, "lm": 4}[label]
    # per item: the shared prefix once (batch 1), then all its choices / context options in one
    # batch; language modelling items are one row each
    assert [B for B, _ in model.calls] == [1, 3, 1, 2, 1, 4, 1, 2, 1, 2] + [1, 2, 1, 2, 1, 2, 1, 3] + [1, 1, 1, 1]
    model.calls.clear()
    plain = evaluate_core(model, byte_tokenizer(), "cpu", eval_dir=root, share_prefix=False)
    assert [B for B, _ in model.calls] == [3, 2, 4, 2, 2] + [2, 2, 2, 3] + [1, 1, 1, 1]
    assert {k: r["accuracy"] for k, r in plain["results"].items()} == {k: r["accuracy"] for k, r in result["results"].items()}


def test_mean_not_sum_of_continuation_loss():
    tok = byte_tokenizer()
    prompt = render_prompt(task("multiple_choice"), [MC_ITEMS[4]], 0)
    mean_nats, _ = score_rows(BigramModel(preference_table()), tokenize_prompt(tok, prompt, 512), "cpu")
    # the reference numbers from the table: log-softmax of a row with 'a' at 3 and the rest at 0
    log_z = math.log(math.exp(3.0) + V - 1)
    loss_a, loss_other = log_z - 3.0, log_z
    # continuation tokens: ' ' (after '?') and 'b' cost loss_other each, every 'a' costs loss_a
    assert mean_nats.tolist() == pytest.approx([2 * loss_other / 2, (2 * loss_other + 8 * loss_a) / 10], rel=1e-5)
    assert 2 * loss_other < 2 * loss_other + 8 * loss_a  # by the sum the short choice would win


@pytest.mark.parametrize("window_pattern", ["L", pytest.param("SL", marks=pytest.mark.slow)])  # SL: ~7 s on 2 CPU cores
def test_batched_scoring_matches_unbatched_gpt(window_pattern):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern=window_pattern, sliding_window=8)
    model = GPT(config)
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()

    def reference(ids, start):
        x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        with torch.no_grad():
            nats = model(x, y, loss_reduction="none")[0, start - 1 :]
            greedy = model(x)[0, start - 1 :].argmax(-1)
        return nats.mean().item(), bool((greedy == y[0, start - 1 :]).all())

    prefix = [256] + torch.randint(0, 256, (20,)).tolist()
    unrelated = [(torch.randint(0, 256, (n,)).tolist(), s) for n, s in [(20, 15), (7, 3), (33, 32), (12, 1)]]
    shared = [(prefix + torch.randint(0, 256, (n,)).tolist(), s) for n, s in [(5, 21), (1, 21), (12, 24), (9, 23)]]
    for rows in (unrelated, shared, shared[:2]):
        for share_prefix in (True, False):
            mean_nats, exact = score_rows(model, rows, "cpu", pad_id=256, share_prefix=share_prefix)
            for b, (ids, start) in enumerate(rows):
                ref_mean, ref_exact = reference(ids, start)
                assert mean_nats[b].item() == pytest.approx(ref_mean, rel=1e-5, abs=1e-6)
                assert bool(exact[b]) == ref_exact
    assert shared_prefix_len(shared) == 21 and shared_prefix_len(unrelated) == 0
    assert shared_prefix_len([(prefix + [1, 2], 22), (prefix + [1, 3], 22)]) == 21 + 1  # capped at min(start)
    # a row made of the model's own greedy choices is "exact"; change one token and it is not
    ids = [256]
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    wrong = ids[:-1] + [(ids[-1] + 1) % 256]
    _, exact = score_rows(model, [(ids, 3), (wrong, 3)], "cpu")
    assert exact.tolist() == [True, False]


# ------------------------------------------------------------------------------------------------
# the metric: centring, missing tasks, baselines, errors


def test_centering_and_core_average_over_present_tasks(tmp_path):
    root = write_eval_dir(tmp_path)
    result = evaluate_core(BigramModel(preference_table()), byte_tokenizer(), "cpu", eval_dir=root)
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0 and centered_accuracy(0.625, 0.25) == 0.5
    centered = {"mc": (0.8 - 0.25) / 0.75, "schema": (0.75 - 0.5) / 0.5, "lm": 0.5}
    for label, c in centered.items():
        assert result["results"][label]["centered"] == pytest.approx(c)
    assert result["core"] == pytest.approx(sum(centered.values()) / 3)
    assert result["tasks_present"] == 3 and result["tasks_total"] == 4 and result["tasks_missing"] == ["gone"]
    assert "3 of 4" in result["note"] and "gone" in result["note"]
    table = format_core_table(result)
    assert "| gone | missing |" in table and f"**{result['core']:.4f}**" in table

    v2 = evaluate_core(BigramModel(preference_table()), byte_tokenizer(), "cpu", eval_dir=root, baseline="v2")
    assert v2["results"]["mc"]["random_baseline"] == 0.4 and v2["results"]["mc"]["centered"] == pytest.approx((0.8 - 0.4) / 0.6)


def test_progress_lines(tmp_path, monkeypatch):
    from nanochat import core_eval

    monkeypatch.setattr(core_eval, "PROGRESS_EVERY_S", -1.0)  # a line before every item but the first
    lines = []
    evaluate_core(BigramModel(preference_table()), byte_tokenizer(), "cpu", eval_dir=write_eval_dir(tmp_path), log=lines.append)
    assert "CORE mc: 4/5 items, 0.7500 so far" in "\n".join(lines)
    assert sum(line.startswith("CORE lm ") and "acc 0.5000" in line for line in lines) == 1


def test_max_per_task_limits_items(tmp_path):
    root = write_eval_dir(tmp_path)
    result = evaluate_core(BigramModel(preference_table()), byte_tokenizer(), "cpu", max_per_task=2, eval_dir=root)
    assert {r["num_items"] for r in result["results"].values()} == {2} and result["max_per_task"] == 2


def test_empty_file_counts_as_missing_and_nothing_present_is_an_error(tmp_path):
    root = write_eval_dir(tmp_path)
    open(os.path.join(root, "b", "lm.jsonl"), "w").close()
    result = evaluate_core(BigramModel(preference_table()), byte_tokenizer(), "cpu", eval_dir=root)
    assert result["tasks_missing"] == ["lm", "gone"] and result["tasks_present"] == 2
    for name in ("a/mc.jsonl", "b/schema.jsonl"):
        os.remove(os.path.join(root, name))
    with pytest.raises(NanochatError, match="no CORE task data"):
        evaluate_core(BigramModel(preference_table()), byte_tokenizer(), "cpu", eval_dir=root)


def test_bad_inputs_raise_one_line_errors(tmp_path):
    model, tok = BigramModel(preference_table()), byte_tokenizer()
    with pytest.raises(NanochatError, match="eval dir not found"):
        evaluate_core(model, tok, "cpu", eval_dir=str(tmp_path / "nope"))
    root = write_eval_dir(tmp_path)
    with pytest.raises(NanochatError, match="baseline"):
        evaluate_core(model, tok, "cpu", eval_dir=root, baseline="v3")
    with pytest.raises(NanochatError, match="max_per_task"):
        evaluate_core(model, tok, "cpu", eval_dir=root, max_per_task=0)
    with open(os.path.join(root, "a", "mc.jsonl"), "a") as f:
        f.write('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(NanochatError, match=r"mc.jsonl:6: .*gold"):
        evaluate_core(model, tok, "cpu", eval_dir=root)
    with open(os.path.join(root, "a", "mc.jsonl"), "w") as f:
        f.write("not json\n")
    with pytest.raises(NanochatError, match=r"mc.jsonl:1"):
        evaluate_core(model, tok, "cpu", eval_dir=root)
    with open(os.path.join(root, "core_tasks.tsv"), "a") as f:
        f.write('x\tx.jsonl\tgeneration\t0\t" "\t0\t0\n')
    with pytest.raises(NanochatError, match=r"core_tasks.tsv:6: unknown task_type"):
        load_task_table(root)


def test_eval_dir_resolution(tmp_path, base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_DIR", raising=False)
    with pytest.raises(NanochatError, match="eval_bundle"):
        get_eval_dir()
    (base_dir / "eval_bundle").mkdir()
    assert get_eval_dir() == str(base_dir / "eval_bundle")
    monkeypatch.setenv("NANOCHAT_EVAL_DIR", str(tmp_path))
    assert get_eval_dir() == str(tmp_path)
    assert get_eval_dir(str(base_dir)) == str(base_dir)


@pytest.mark.skipif(not os.path.isfile(os.path.join(CORE_DATA, "core_tasks.tsv")), reason="needs ../shared/data/eval/core")
def test_real_task_table_loads():
    tasks = load_task_table(CORE_DATA)
    assert len(tasks) == 22 and {t.task_type for t in tasks} == {"multiple_choice", "schema", "language_modeling"}
    by_label = {t.label: t for t in tasks}
    assert by_label["arc_easy"].continuation_delimiter == "\nAnswer: " and by_label["commonsense_qa"].random_baseline("v2") == 0.403


# ------------------------------------------------------------------------------------------------
# distributed: 2 ranks (torchrun, gloo) report exactly what 1 process reports


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("core_eval_ddp_worker", os.path.join(TESTS_DIR, "helpers", "core_eval_ddp_worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    write_eval_dir(eval_dir)
    more_mc = [{"query": f"Question {i}: pick one", "choices": [f"c{i}", f"d{i + 1}", "aab"], "gold": i % 3} for i in range(13)]
    write_jsonl(os.path.join(eval_dir, "a", "mc.jsonl"), more_mc)  # 13 items: uneven stripes, subset of 9
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(TESTS_DIR, "helpers", "core_eval_ddp_worker.py"), str(eval_dir), str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    tok = worker.make_tokenizer()
    reference = evaluate_core(worker.make_model(tok.vocab_size), tok, "cpu", max_per_task=worker.MAX_PER_TASK, eval_dir=str(eval_dir))
    for rank in range(2):
        with open(out / f"rank{rank}.json") as f:
            got = json.load(f)
        for label, r in reference["results"].items():
            assert got["results"][label]["num_items"] == r["num_items"]
            assert got["results"][label]["accuracy"] == r["accuracy"], (rank, label)
        assert got["core"] == pytest.approx(reference["core"], abs=1e-12)
    assert reference["results"]["mc"]["num_items"] == 9


# ------------------------------------------------------------------------------------------------
# scripts/base_eval.py end to end


def save_tiny_checkpoint(base_dir):
    tok = byte_tokenizer()
    tok.save(os.path.join(base_dir, "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights(seed=0)
    meta = {"stage": "base", "model_tag": "d2", "step": 5, "model_config": config.to_dict()}
    save_checkpoint(checkpoint_dir("base", "d2", str(base_dir)), 5, model.state_dict(), None, meta)


def write_tiny_shards(data_dir):
    """Two small parquet shards (train, val): the real shards take the byte tokenizer ~10 s per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir.mkdir()
    for i in range(2):
        docs = [f"Document {i}-{j}: the quick brown fox jumps over the lazy dog {j} times. " * 4 for j in range(40)]
        pq.write_table(pa.table({"text": docs}), data_dir / f"shard_{i:05d}.parquet", row_group_size=20)
    return data_dir


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(CORE_DATA, "core_tasks.tsv")), reason="needs ../shared/data/eval/core")
def test_base_eval_end_to_end(tmp_path):
    base = tmp_path / "base"
    save_tiny_checkpoint(base)
    env = make_env(base, NANOCHAT_DATA_DIR=write_tiny_shards(tmp_path / "data"), OMP_NUM_THREADS=1)  # 1 thread: robust on a shared CPU
    args = ["--eval-dir", CORE_DATA, "--max-per-task", 4, "--split-tokens", 512, "--device-batch-size", 4, "--num-samples", 2, "--sample-tokens", 4, "--device-type", "cpu"]
    proc = run_script("scripts.base_eval", *args, env=env, timeout=300)
    out = proc.stdout
    assert "| task | type | shots | items | accuracy | centered |" in out and "| **CORE** |" in out
    assert "| hellaswag | missing |" in out and "train bpb" in out and "val bpb" in out and out.count("sample: ") == 2
    with open(base / "report" / "base-eval.json") as f:
        report = json.load(f)
    core = report["core"]
    missing = [t.label for t in load_task_table(CORE_DATA) if not os.path.isfile(os.path.join(CORE_DATA, t.file))]
    assert core["tasks_missing"] == missing and core["tasks_present"] == 22 - len(missing)
    assert all(r["num_items"] == 4 for r in core["results"].values())
    assert -1.0 <= core["core"] <= 1.0 and report["step"] == 5 and report["model_tag"] == "d2"
    assert set(report["bpb"]) == {"train", "val"} and all(0 < r["bpb"] < 20 for r in report["bpb"].values())
    assert len(report["samples"]) == 2
    md = (base / "report" / "base-eval.md").read_text()
    assert "## CORE" in md and "| **CORE** |" in md and "## Bits per byte" in md
    with open(base / "report" / "base_eval.json") as f:  # the stage record of nanochat.report
        stage = json.load(f)
    assert stage["metrics"]["core"] == core["core"] and stage["metrics"]["val_bpb"] == report["bpb"]["val"]["bpb"]

    # a bad --eval-dir is a one-line error
    proc = run_script("scripts.base_eval", "--eval-dir", tmp_path / "nope", "--eval", "core", env=env, check=False)
    assert proc.returncode == 1 and "eval dir not found" in proc.stderr and proc.stderr.strip().count("\n") == 0
