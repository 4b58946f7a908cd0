"""
The lab (nanochat/lab.py, scripts/lab.py) on hand-made registries: the Wilson interval against
published values, the winner and "tie" of compare rows, the compute multiplier on synthetic
power-law curves (exact, interpolated and extrapolated), the compare table end to end, the
evaluation baselines (chance, the parent checkpoint) in show and compare, curves, the report (its
deltas, stale data recipes, the analyzer's recommendations), --json on every verb and one-line errors.
"""

import json
import math
import os

import pytest

from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.common import NanochatError
from nanochat import lab
from nanochat.registry import Registry, file_hash
from scripts import lab as lab_cli


# ------------------------------------------------------------------------------------------------ statistics


def test_wilson_interval_matches_published_values():
    # Newcombe 1998, "Two-sided confidence intervals for the single proportion", table I, method 3 (Wilson score)
    for (c, n), expected in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        assert lab.wilson(c / n, n) == (pytest.approx(expected[0], abs=5e-5), pytest.approx(expected[1], abs=5e-5)), (c, n)
    assert lab.wilson(0.0, 400)[0] == 0.0 and lab.wilson(1.0, 400)[1] == 1.0  # exact, no round-off residue
    lo, hi = lab.wilson(1.0, 20)  # symmetric, and not the zero-width interval of p +- z sqrt(p(1-p)/n)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.1611, abs=5e-5)
    # it narrows as 1/sqrt(n) and tends to the normal interval
    lo, hi = lab.wilson(0.3, 100000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.3 * 0.7 / 100000), rel=1e-3)
    with pytest.raises(ValueError):
        lab.wilson(0.5, 0)


def test_interval_kind():
    assert lab.interval({"value": 0.5, "n": 100, "kind": "proportion"}) == lab.wilson(0.5, 100)
    assert lab.interval({"value": 0.2, "n": 100, "stderr": 0.01, "kind": "mean"}) == (pytest.approx(0.2 - 0.0196, abs=1e-4), pytest.approx(0.2 + 0.0196, abs=1e-4))
    assert lab.interval({"value": 1.2, "n": 4096, "kind": None}) is None  # bpb: n tokens, no interval


def cell(value, n=None):
    lo, hi = lab.wilson(value, n) if n else (None, None)
    return {"value": value, "lo": lo, "hi": hi}


def test_winner_and_tie_on_hand_made_numbers():
    # 60% vs 50% on 1000 problems each: [0.569, 0.630] vs [0.469, 0.531], apart: a winner
    assert lab.winner([cell(0.6, 1000), cell(0.5, 1000)], lower_is_better=False) == 0
    # the same accuracies on 20 problems: [0.387, 0.781] vs [0.299, 0.701] overlap: a tie
    assert lab.winner([cell(0.6, 20), cell(0.5, 20)], lower_is_better=False) == "tie"
    assert lab.winner([cell(0.5, 1000), cell(0.6, 1000), cell(0.3, 1000)], lower_is_better=False) == 1
    # no intervals: the better value wins, equal values tie; lower is better for losses
    assert lab.winner([cell(3.2), cell(3.1)], lower_is_better=True) == 1
    assert lab.winner([cell(3.2), cell(3.1)], lower_is_better=False) == 0
    assert lab.winner([cell(3.1), cell(3.1)], lower_is_better=True) == "tie"
    # a point inside the best one's interval ties with it
    assert lab.winner([cell(0.6, 20), cell(0.55)], lower_is_better=False) == "tie"
    assert lab.winner([cell(0.6, 20), None], lower_is_better=False) is None  # one value: no contest


# ------------------------------------------------------------------------------------------------ the compute multiplier


def power_law(flops, efficiency=1.0):
    """val bpb = 10 (efficiency x F)^-0.1: a run `efficiency` times as compute-efficient as efficiency 1."""
    return [(f, 10 * (efficiency * f) ** -0.1) for f in flops]


def grid(lo, hi, n=12):
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def test_compute_multiplier_is_exact_on_power_laws():
    first = power_law(grid(1e9, 1e12))
    # twice as efficient, ending inside the first run's range: interpolated, exactly 2
    m = lab.compute_multiplier(first, power_law(grid(1e9, 1e11), 2.0))
    assert m["multiplier"] == pytest.approx(2.0, rel=1e-9) and not m["extrapolated"]
    assert m["flops_other"] == pytest.approx(1e11) and m["target_bpb"] == pytest.approx(10 * 2e11 ** -0.1)
    # ending below the first run's final bpb: the first run's line is extrapolated, still exact, and marked
    m = lab.compute_multiplier(first, power_law(grid(1e10, 1e12), 2.0))
    assert m["multiplier"] == pytest.approx(2.0, rel=1e-9) and m["extrapolated"]
    # a quarter as efficient: the first run got there at a quarter of the compute
    m = lab.compute_multiplier(first, power_law(grid(1e9, 1e11), 0.25))
    assert m["multiplier"] == pytest.approx(0.25, rel=1e-9) and not m["extrapolated"]
    # ... and before its first evaluation: extrapolated backwards
    m = lab.compute_multiplier(first, power_law(grid(1e9, 2e9, 3), 0.25))
    assert m["multiplier"] == pytest.approx(0.25, rel=1e-9) and m["extrapolated"]
    # the same run: 1
    assert lab.compute_multiplier(first, first)["multiplier"] == pytest.approx(1.0)


def test_compute_multiplier_interpolates_between_evaluations_in_log_log():
    first = [(1e9, 4.0), (1e10, 2.0)]  # a straight line in log-log between two points: bpb 2^1.5 at F = 10^9.5
    m = lab.compute_multiplier(first, [(1e8, 5.0), (1e9, 2 ** 1.5)])
    assert m["flops_first"] == pytest.approx(10 ** 9.5) and m["multiplier"] == pytest.approx(10 ** 0.5) and not m["extrapolated"]
    flat = [(1e9, 3.0), (1e10, 3.0), (1e11, 3.1)]  # never gets below 3: the fitted line does not fall
    assert lab.flops_to_reach(flat, 2.0) == (None, True)
    assert lab.compute_multiplier(flat, [(1e9, 2.0)])["multiplier"] is None
    assert lab.compute_multiplier([], first) is None


# ------------------------------------------------------------------------------------------------ compare, curves, report


def write_run(reg, base, run_id, name, tag, curve, evals=(), **extra):
    """A finished base run: its registry row, train evals from `curve` [(step, bpb)], a metrics.jsonl."""
    ckpt = checkpoint_dir("base", tag, str(base))
    os.makedirs(os.path.join(ckpt, "run"), exist_ok=True)
    rows = [{"step": s, "loss": b + 0.1, "tok_per_s": 1000.0 * (1 + len(name)), "mfu": 0.3} for s, b in curve] + [{"step": s, "val_bpb": b} for s, b in curve]
    with open(os.path.join(ckpt, "run", "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    reg.put_run({"id": run_id, "name": name, "stage": "base", "model_tag": tag, "ckpt_dir": ckpt, "status": "done", "started": 1000.0 + len(reg.runs()),
                 "config": {"total_batch_size": 1000}, "flops_per_token": 1e6, "device": "cuda NVIDIA H100", "world_size": 8, "wall_s": 3600.0} | extra)
    reg.add_evals([{"run_id": run_id, "step": s, "metric": "val_bpb", "value": b, "source": "train"} for s, b in curve])
    reg.add_evals([{"run_id": run_id, "step": curve[-1][0], "source": "chat_eval"} | e for e in evals])


@pytest.fixture
def registry(base_dir):
    with Registry() as reg:
        steps = [10, 20, 40, 80, 160]
        a = [(s, 10 * (1e9 * s) ** -0.1) for s in steps]  # FLOPs = 1e6 x 1000 x step
        b = [(s, 10 * (2e9 * s) ** -0.1) for s in steps[:3]]  # twice as efficient, a quarter as long
        write_run(reg, base_dir, "aaaa0001", "ref", "a", a, [{"metric": "ARC-Easy", "value": 0.50, "n": 1000, "kind": "proportion"},
                                                             {"metric": "GSM8K", "value": 0.10, "n": 50, "kind": "proportion"}])
        write_run(reg, base_dir, "bbbb0002", "new", "b", b, [{"metric": "ARC-Easy", "value": 0.60, "n": 1000, "kind": "proportion"},
                                                             {"metric": "GSM8K", "value": 0.14, "n": 50, "kind": "proportion"}], wall_s=1800.0)
        yield reg


def test_compare_table(registry, capsys):
    result = lab.compare(registry, [registry.get_run("ref"), registry.get_run("new")], price=2.0)
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["ARC-Easy"]["winner"] == "new" and rows["GSM8K"]["winner"] == "tie"  # 60 vs 50 of 1000 apart; 14 vs 10 of 50 not
    assert rows["ARC-Easy"]["cells"][1]["delta"] == pytest.approx(0.1) and rows["ARC-Easy"]["cells"][0]["lo"] == pytest.approx(lab.wilson(0.5, 1000)[0])
    assert rows["final val_bpb"]["winner"] == "ref" and rows["best val_bpb"]["cells"][1]["value"] == pytest.approx(10 * (2e9 * 40) ** -0.1)
    assert rows["GPU-hours"]["cells"][0]["value"] == pytest.approx(8.0) and rows["cost ($)"]["cells"][1]["value"] == pytest.approx(8.0)  # 0.5 h x 8 GPUs x $2
    assert rows["wall time (s)"]["winner"] == "new" and rows["tokens/s"]["cells"][0]["value"] == pytest.approx(4000.0) and rows["MFU"]["winner"] == "tie"
    (m,) = result["compute_multiplier"]
    assert m["multiplier"] == pytest.approx(2.0, rel=1e-9) and not m["extrapolated"] and m["run"] == "new"
    lab_cli.main(["compare", "ref", "new", "--gpu-hour-price", "2"])
    out = capsys.readouterr().out
    assert "| ARC-Easy | 0.5000 [0.469, 0.531] n=1,000 | 0.6000 [0.569, 0.630] n=1,000 (+0.1) | new |" in out
    assert "compute multiplier at val bpb" in out and "2.000x" in out


def test_curves_png(registry, tmp_path):
    out = tmp_path / "c.png"
    lab_cli.main(["curves", "ref", "new", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10000


def test_report_counts_bests_and_deltas_to_the_previous_report(registry, capsys, monkeypatch):
    monkeypatch.setattr(lab_cli, "now", lambda: 1000.0 + 3600)  # the runs started at t = 1000, 1001
    first = lab_cli.make_report(registry, lab_cli.parse_since("24h"), 2.0)
    assert first["counts"]["started"] == 2 and first["counts"]["done"] == 2 and first["gpu_hours"] == pytest.approx(12.0) and first["cost"] == pytest.approx(24.0)
    assert first["best"]["base/ARC-Easy"]["run"] == "new" and first["best"]["base/final val_bpb"]["run"] == "ref" and first["best"]["base/ARC-Easy"]["delta"] is None
    registry.add_evals([{"run_id": "aaaa0001", "step": 999, "metric": "ARC-Easy", "value": 0.7, "n": 1000, "kind": "proportion", "source": "chat_eval"}])
    second = lab_cli.make_report(registry, lab_cli.parse_since("30m"), 2.0)
    assert second["counts"]["started"] == 0 and second["previous_report"] == first["time"]
    assert second["best"]["base/ARC-Easy"]["run"] == "ref" and second["best"]["base/ARC-Easy"]["delta"] == pytest.approx(0.1)
    text = lab_cli.format_report(second)
    assert "## Best run per metric" in text and "| base/ARC-Easy | 0.7000 | ref | 0.6000 | 0.1000 |" in text


def chat_run(reg, tmp_path, run_id, name, stage, evals, parent=None, parent_step=None, **extra):
    """A finished chat-stage run with chat_eval results at step 50: evals [(metric, value, chance)] on 200 problems."""
    reg.put_run({"id": run_id, "name": name, "stage": stage, "model_tag": "d4", "ckpt_dir": str(tmp_path / name), "status": "done",
                 "started": 1000.0 + len(reg.runs()), "parent_stage": "mid" if parent else None, "parent_tag": "d4" if parent else None,
                 "parent_step": parent_step, "parent_run_id": parent} | extra)
    reg.add_evals([{"run_id": run_id, "step": 50, "metric": m, "value": v, "n": 200, "kind": "proportion", "baseline": b, "source": "chat_eval"}
                   for m, v, b in evals])


def test_show_and_compare_put_parent_and_chance_next_to_each_evaluation(base_dir, tmp_path, capsys):
    with Registry() as reg:
        chat_run(reg, tmp_path, "mid00001", "mid", "mid", [("ARC-Easy", 0.40, 0.25)])
        reg.add_evals([{"run_id": "mid00001", "step": 80, "metric": "ARC-Easy", "value": 0.30, "n": 200, "kind": "proportion", "source": "chat_eval"}])
        # two SFT runs from the mid run's checkpoints at steps 50 and 80; the second has no result for GSM8K's parent
        chat_run(reg, tmp_path, "sft00001", "sft-a", "sft", [("ARC-Easy", 0.55, 0.25), ("GSM8K", 0.05, 0.0)], parent="mid00001", parent_step=50)
        chat_run(reg, tmp_path, "sft00002", "sft-b", "sft", [("ARC-Easy", 0.50, 0.25)], parent="mid00001", parent_step=80)
        chat_run(reg, tmp_path, "sft00003", "sft-c", "sft", [("ARC-Easy", 0.45, 0.25)], parent="mid00001", parent_step=60)  # not evaluated there
        assert lab.parent_evals(reg, reg.get_run("sft-a")) == {("ARC-Easy", None): 0.40}
        assert lab.parent_evals(reg, reg.get_run("sft-b")) == {("ARC-Easy", None): 0.30}  # the parent step's result, not the parent's latest
        assert lab.parent_evals(reg, reg.get_run("sft-c")) == {} and lab.parent_evals(reg, reg.get_run("mid")) == {}
        result = lab.compare(reg, [reg.get_run(n) for n in ("sft-a", "sft-b", "sft-c")], price=2.0)
        rows = {r["metric"]: r["cells"] for r in result["rows"]}
        assert [(c["parent"], c["baseline"]) for c in rows["ARC-Easy"]] == [(0.40, 0.25), (0.30, 0.25), (None, 0.25)]
        assert rows["GSM8K"][0]["parent"] is None and rows["GSM8K"][0]["baseline"] == 0.0 and rows["GSM8K"][1] is None
    lab_cli.main(["compare", "sft-a", "sft-b", "sft-c"])
    out = capsys.readouterr().out
    assert "| ARC-Easy | 0.5500 [0.481, 0.617] n=200; parent 0.4000, chance 0.2500 | 0.5000 [0.431, 0.569] n=200 (-0.05); parent 0.3000, chance 0.2500 |" in out
    assert "| GSM8K | 0.0500 [0.027, 0.090] n=200; chance 0.0000 | - | - | - |" in out and "parent: the same evaluation" in out
    lab_cli.main(["show", "sft-a"])
    out = capsys.readouterr().out
    assert "| source | step | metric | value | n | 95% interval | parent | chance |" in out
    assert "| chat_eval | 50 | ARC-Easy | 0.5500 | 200 | [0.4808, 0.6174] | 0.4000 | 0.2500 |" in out and "(mid/d4 step 50)" in out
    lab_cli.main(["show", "sft-b", "--json"])
    (ev,) = json.loads(capsys.readouterr().out)["evals"]
    assert ev["parent"] == 0.30 and ev["baseline"] == 0.25


def test_report_lists_stale_recipes_and_the_analyzers_warnings(registry, tmp_path, monkeypatch):
    recipes = {name: tmp_path / f"{name}.json" for name in ("same", "edited", "deleted")}
    for path in recipes.values():
        path.write_text('{"tasks": ["smoltalk"]}')
    for i, name in enumerate(("same", "edited", "deleted", "edited")):
        path = str(recipes[name])
        registry.put_run({"id": f"sft{i:05d}", "name": f"sft-{name}-{i}", "stage": "sft", "model_tag": "d4", "status": "done", "started": 900.0,
                          "ckpt_dir": str(tmp_path / f"sft{i}"), "recipe_path": path, "recipe_hash": file_hash(path)})
    recipes["edited"].write_text('{"tasks": ["smoltalk", "gsm8k"]}')
    recipes["deleted"].unlink()
    # a run that finished in the window with a NaN loss (the analyzer: divergence), one long before it (not analysed)
    for run_id, started, tag in (("nan00001", 3000.0, "nan"), ("old00001", -1e6, "old")):
        ckpt = checkpoint_dir("base", tag, os.environ["NANOCHAT_BASE_DIR"])
        os.makedirs(os.path.join(ckpt, "run"))
        with open(os.path.join(ckpt, "run", "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps({"step": s, "loss": 3.0 - 0.01 * s if s < 20 else float("nan")}) + "\n" for s in range(1, 21)))
        registry.put_run({"id": run_id, "name": tag, "stage": "base", "model_tag": tag, "ckpt_dir": ckpt, "status": "failed", "started": started, "ended": started + 60})
    monkeypatch.setattr(lab_cli, "now", lambda: 1000.0 + 3600)
    rep = lab_cli.make_report(registry, lab_cli.parse_since("24h"), 2.0)
    stale = {x["recipe"]: x for x in rep["stale_recipes"]}
    assert stale.keys() == {str(recipes["edited"]), str(recipes["deleted"])}
    assert stale[str(recipes["edited"])]["runs"] == ["sft-edited-1", "sft-edited-3"] and stale[str(recipes["edited"])]["now"] == file_hash(recipes["edited"])
    assert stale[str(recipes["deleted"])]["now"] is None
    (advice,) = rep["recommendations"]  # ref and new are healthy; old ended before the window
    assert advice["run"] == "nan" and advice["warnings"] == ["divergence"] and advice["recommendation"].startswith("diverged at step 20")
    assert rep["analysed"] == 7  # ref, new, the four SFT runs (no metrics: nothing to warn about) and nan
    text = lab_cli.format_report(rep)
    assert f"- `{recipes['edited']}` changed (sha256 " in text and "runs sft-edited-1, sft-edited-3 trained on data it no longer gives" in text
    assert f"- `{recipes['deleted']}` gone: runs sft-deleted-2" in text and str(recipes["same"]) not in text
    assert "- nan (base/nan, failed) divergence: diverged at step 20: lower the LR" in text and "6 other finished run(s) without warnings" in text


def test_analyze_reads_the_runs_metrics_log(registry, capsys):
    lab_cli.main(["analyze", "ref"])
    out = capsys.readouterr().out
    assert out.startswith("# ref (aaaa0001)") and "best val_bpb" in out and "at step 160" in out and "recommendation:" in out
    lab_cli.main(["analyze", "new", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == "base" and result["metric"] == "val_bpb" and result["n_eval"] == 3 and result["best"][0] == 40


def test_every_verb_has_json_and_bad_input_is_one_line(registry, capsys, tmp_path):
    verbs = [["list"], ["list", "--stage", "base", "--status", "done"], ["show", "ref"], ["compare", "ref", "new"], ["analyze", "ref"], ["curves", "ref", "--out", str(tmp_path / "x.png")],
             ["reindex", "--check"], ["models"], ["note", "ref", "a note"], ["tag", "new", "baseline"], ["report", "--since", "7d"]]
    for argv in verbs:
        lab_cli.main(argv + ["--json"])
        json.loads(capsys.readouterr().out)
    assert [(n["kind"], n["text"]) for n in registry.notes("run:aaaa0001")] == [("note", "a note")]
    assert [(n["kind"], n["text"]) for n in registry.notes("run:bbbb0002")] == [("tag", "baseline")]
    for argv, msg in ((["show", "nope"], "no run 'nope'"), (["compare", "ref"], "two runs or more"), (["report", "--since", "soon"], "--since 'soon'"),
                      (["alias", "m@prod", "v1"], "no model version m:v1"), (["alias", "mprod", "v1"], "usage: lab alias"), (["register", "ref", "--name", "m"], "no checkpoint left"),
                      (["note", "nope", "x"], "no registered model 'nope'"), (["compare", "ref", "new", "--gpu-hour-price", "-1"], "must be a number >= 0")):
        with pytest.raises(NanochatError, match=msg):
            lab_cli.main(argv)
