"""
LoRA adapters (nanochat/lora.py): merged == unmerged logits, PEFT's file layout and key names
(differential against the PEFT package), engine decode with an adapter, training that moves only
the adapter, checkpoints of a LoRA run (resume, load, merge CLI) and the errors of the flags and
of --lora directories.
"""

import json
import os

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from conftest import byte_tokenizer
from helpers.rl_util import make_sft_base, run_main
from helpers.scripts_util import SHARED_DATA, make_env, read_metrics, run_script
from nanochat.checkpoint_manager import checkpoint_dir, load_meta, load_model, load_tensor_file, load_weights, save_checkpoint
from nanochat.common import NanochatError
from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, GPTConfig
from nanochat.kernels import decoding
from nanochat.lora import TARGETS, LoraSpec, adapter_state_dict, apply_lora, load_adapter, lora_modules, lora_parameters, merge_lora, read_adapter, save_adapter
from nanochat.optim import build_adapter_optimizer
from nanochat.training import add_run_args, parse_run_args, train_step
from test_gpt import make_model

TOK = byte_tokenizer()
ALL = ",".join(TARGETS)


def with_adapter(model, spec, seed=1, std=0.05):
    """apply_lora, then non-zero B (and a new A) so that the adapter changes the logits."""
    params = apply_lora(model, spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tokens(B=2, T=16, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the maths


def test_a_fresh_adapter_is_the_identity_and_merging_keeps_the_logits():
    model = make_model()
    idx = tokens()
    base = model(idx)
    params = apply_lora(model, LoraSpec(4, 8.0, ALL))
    assert torch.equal(model(idx), base)  # B = 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert [p.requires_grad for p in params] == [True] * len(params) == [True] * (2 * 6 * model.config.n_layer)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    unmerged = model(idx)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter does something
    merge_lora(model)
    assert not lora_modules(model) and sorted(model.state_dict()) == sorted(make_model().state_dict())
    assert (model(idx) - unmerged).abs().max() <= 1e-5


def test_forward_is_base_plus_scaled_low_rank_update():
    model = with_adapter(make_model(), LoraSpec(2, 6.0, "q"))
    m = model.transformer.h[0].attn.c_q
    x = torch.randn(3, model.config.n_embd)
    expected = x @ m.weight.T + x @ m.lora_A.weight.T @ m.lora_B.weight.T * (6.0 / 2)
    assert torch.allclose(m(x), expected, atol=1e-6)
    assert m.lora_A.weight.shape == (2, 64) and m.lora_B.weight.shape == (64, 2) and m.lora_A.weight.dtype == torch.float32


def test_engine_decode_with_an_adapter_equals_the_full_forward():
    model = with_adapter(make_model(), LoraSpec(4, 4.0, ALL)).eval()
    idx = tokens(B=1, T=12, seed=3)
    full = model(idx)
    cache = KVCache.for_model(model, batch_size=1, max_len=16)
    with torch.no_grad(), decoding():  # the CPU decode path (kernels.small_linear) for base and adapter
        steps = [model(idx[:, :4], kv_cache=cache)[:, -1]] + [model(idx[:, t : t + 1], kv_cache=cache)[:, -1] for t in range(4, 12)]
    assert (torch.stack(steps, 1) - full[:, 3:]).abs().max() <= 1e-4
    prompt = TOK.encode("hi", prepend="<|bos|>")
    small = with_adapter(make_model(vocab_size=TOK.vocab_size), LoraSpec(4, 4.0, ALL)).eval()
    (out,), _ = Engine(small, TOK).generate_batch(prompt, max_tokens=8, temperature=0.0, stop_tokens=[])
    ids = list(prompt)
    with torch.no_grad():
        for _ in out:
            ids.append(small(torch.tensor([ids]))[0, -1].argmax().item())
    assert out == ids[len(prompt) :]


def test_training_steps_move_only_the_adapter():
    model = make_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = apply_lora(model, LoraSpec(4, 8.0, "q,v,fc"))
    opt = build_adapter_optimizer(params, lr=1e-2)
    A0 = [p.clone() for p in params]
    for step in range(3):
        x = tokens(B=2, T=16, seed=step)
        train_step(model, opt, [(x, torch.roll(x, -1, 1))])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # every base tensor bit-identical
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, A0))  # every adapter factor moved
    held = {id(p) for p in opt.state}
    assert held == {id(p) for p in params} and all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------------------ PEFT's layout


def test_peft_reads_the_config_and_loads_the_tensors_with_the_same_logits(tmp_path):
    spec = LoraSpec(4, 8.0, "q,k,v,o,fc,down")
    ours = with_adapter(make_model(), spec)
    save_adapter(tmp_path, ours, spec, base_model="parent/step_000001")
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.0)
    assert set(config.target_modules) == {"attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert config.base_model_name_or_path == "parent/step_000001" and config.peft_type == peft.PeftType.LORA

    # PEFT's own LoRA on the same base GPT, fed our safetensors file: same key names, same logits
    theirs = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(config.target_modules)))
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(get_peft_model_state_dict(theirs)) == sorted(state) == sorted(adapter_state_dict(ours))
    result = set_peft_model_state_dict(theirs, state)
    assert not [k for k in result.unexpected_keys]
    theirs.eval()
    idx = tokens()
    with torch.no_grad():
        assert (theirs.get_base_model()(idx) - ours(idx)).abs().max() <= 1e-5


def test_an_adapter_peft_saved_loads_here(tmp_path):
    theirs = peft.get_peft_model(make_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn.c_v", "mlp.c_fc"], init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    ours = make_model()
    spec = load_adapter(str(tmp_path), ours)
    assert spec == LoraSpec(2, 4.0, "v,fc")
    idx = tokens()
    with torch.no_grad():
        assert (theirs.eval().get_base_model()(idx) - ours(idx)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ errors


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_run_args(p, parent="sft")
    return parse_run_args(p, [str(a) for a in argv])


@pytest.mark.parametrize("argv, flag", [
    (["--lora-rank", -1], "--lora-rank"), (["--lora-rank", 4, "--lora-alpha", 0], "--lora-alpha"),
    (["--lora-rank", 4, "--lora-targets", "q,x"], "--lora-targets"), (["--lora-rank", 4, "--lora-targets", ""], "--lora-targets"),
    (["--lora-rank", 4, "--lora-dropout", 1], "--lora-dropout"), (["--lora-rank", 4, "--lora-lr", 0], "--lora-lr"),
    (["--lora-alpha", 16], "--lora-alpha"),
])  # fmt: skip
def test_bad_lora_flags_name_the_flag(argv, flag):
    with pytest.raises(NanochatError, match=flag):
        parse(*argv)


def test_good_lora_flags_parse():
    args = parse("--lora-rank", 8, "--lora-targets", "fc, q")
    assert args.lora_rank == 8 and args.lora_targets == "fc, q"


def test_bad_adapter_directories_are_one_line_errors(tmp_path):
    with pytest.raises(NanochatError, match="no adapter_config.json"):
        load_adapter(str(tmp_path), make_model())
    spec = LoraSpec(4, 4.0, "q")
    save_adapter(tmp_path / "narrow", with_adapter(make_model(), spec), spec)
    with pytest.raises(NanochatError, match="does not fit this model: .*attn.c_q.lora_A is"):
        load_adapter(str(tmp_path / "narrow"), make_model(n_embd=32))
    with pytest.raises(NanochatError, match="does not fit this model: it lacks"):
        load_adapter(str(tmp_path / "narrow"), make_model(n_layer=4))
    config = json.loads((tmp_path / "narrow" / "adapter_config.json").read_text())
    (tmp_path / "narrow" / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["c_proj"]}))
    with pytest.raises(NanochatError, match="target_modules"):
        read_adapter(str(tmp_path / "narrow"))
    with pytest.raises(NanochatError, match="already has LoRA adapters"):
        apply_lora(with_adapter(make_model(), spec), spec)


# ------------------------------------------------------------------------------------------------ LoRA runs: checkpoints, resume, merge


TINY = GPTConfig(sequence_len=64, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
SFT = ["--device-batch-size", 2, "--total-batch-size", 256, "--val-conversations", 4, "--eval-every", 2, "--source", "mid", "--lora-rank", 4, "--lora-targets", "q,v,o,fc", "--lora-lr", 0.03]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A base dir with the byte tokenizer, a tiny random GPT as the mid checkpoint "t" (step 1), and a
    recipe of hand-written conversations."""
    tmp = tmp_path_factory.mktemp("lora")
    base = tmp / "base"
    TOK.save(base / "tokenizer")
    model = GPT(TINY)
    model.init_weights(seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)  # starts near zero: adapters below it could not move the logits
        for blk in model.transformer.h:  # c_proj starts at zero: give the blocks something to do
            blk.attn.c_proj.weight.normal_(0, 0.02)
    save_checkpoint(checkpoint_dir("mid", "t", str(base)), 1, model.state_dict(), None, {"stage": "mid", "model_tag": "t", "step": 1, "model_config": TINY.to_dict(), "tokenizer": TOK.fingerprint()})
    chats = tmp / "chats.jsonl"
    words = ["red", "blue", "green", "one", "two", "cat", "dog", "sun"]
    with open(chats, "w") as f:
        for i in range(40):
            q = f"{words[i % 8]} {words[(i * 3) % 8]}?"
            f.write(json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": q[::-1]}]) + "\n")
    recipe = tmp / "chat.json"
    recipe.write_text(json.dumps({"seed": 1, "tasks": [{"task": "CustomJSON", "args": {"path": str(chats)}}]}))
    return {"base": base, "recipe": str(recipe), "env": make_env(base, OMP_NUM_THREADS=1, NANOCHAT_TASKS_DIR=str(tmp))}


def sft(lab, monkeypatch, tag, *extra):
    from scripts import chat_sft

    mid = checkpoint_dir("mid", tag, str(lab["base"]))
    if not os.path.exists(mid):
        os.symlink(checkpoint_dir("mid", "t", str(lab["base"])), mid)
    run_main(chat_sft.main, [*SFT, "--recipe", lab["recipe"], "--model-tag", tag, *extra], lab["env"], monkeypatch)


def rows(lab, tag):
    return read_metrics(os.path.join(checkpoint_dir("sft", tag, str(lab["base"])), "run", "metrics.jsonl"))


def test_a_lora_run_saves_the_adapter_resumes_exactly_and_loads_merged(lab, monkeypatch):
    base = str(lab["base"])
    sft(lab, monkeypatch, "ref", "--num-iterations", 4)
    with pytest.raises(SystemExit) as stop:
        sft(lab, monkeypatch, "cut", "--num-iterations", 4, "--stop-at-step", 2)
    assert stop.value.code == 143
    sft(lab, monkeypatch, "cut", "--num-iterations", 4, "--resume")
    ref, cut = rows(lab, "ref"), rows(lab, "cut")
    assert [r["step"] for r in ref] == [r["step"] for r in cut] and any(r["step"] > 2 and "loss" in r for r in ref)
    val = [r["val_loss"] for r in ref if "val_loss" in r]
    assert val[-1] < val[0] - 0.01  # it learns
    for a, b in zip(ref, cut):
        for key in ("loss", "val_loss"):
            assert (key in a) == (key in b) and a.get(key) == pytest.approx(b.get(key), abs=1e-6), (a["step"], key)

    # the step directory: the adapter in PEFT's layout, no model.pt, adapter-only optimizer state
    step_dir = os.path.join(checkpoint_dir("sft", "ref", base), "step_000004")
    assert sorted(os.listdir(step_dir)) == ["adapter_config.json", "adapter_model.safetensors", "meta.json", "optim_rank0.pt"]
    meta = load_meta(checkpoint_dir("sft", "ref", base), 4)
    assert meta["lora"] == {"rank": 4, "alpha": 4.0, "targets": ["q", "v", "o", "fc"], "dropout": 0.0}
    assert meta["parent"] == {"stage": "mid", "model_tag": "ref", "step": 1}
    config = json.load(open(os.path.join(step_dir, "adapter_config.json")))
    assert config["base_model_name_or_path"] == os.path.join(checkpoint_dir("mid", "ref", base), "step_000001")
    optim = load_tensor_file(os.path.join(step_dir, "optim_rank0.pt"), "cpu")
    assert len(optim["state"]) == 2 * 4 * TINY.n_layer and [g["name"] for g in optim["param_groups"]] == ["lora"]

    # the base weights did not move; load_model gives parent + adapter merged
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    parent, _, _ = load_model("mid", "cpu", model_tag="t", step=1)
    unmerged, _ = load_weights("sft", "ref", 4, "cpu", merge=False)
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in unmerged.state_dict().items() if "lora_" not in k)
    merged, _, _ = load_model("sft", "cpu", model_tag="ref")
    idx = tokens(T=20) % TOK.vocab_size
    with torch.no_grad():
        assert (merged(idx) - unmerged.eval()(idx)).abs().max() <= 1e-5
        assert (merged(idx) - parent(idx)).abs().max() > 1e-4  # the adapter learned something

    # a full fine-tuning run on top of the LoRA checkpoint (rl's parent is sft): the merged model, all trainable
    assert all(p.requires_grad for p in merged.parameters())

    # a resume with other --lora-* flags is refused
    with pytest.raises(NanochatError, match="--resume: .* holds a LoRA run"):
        sft(lab, monkeypatch, "cut", "--num-iterations", 6, "--resume", "--lora-rank", 8)


def lora_cli(capsys, *argv):
    """scripts.lora in this process, as run_main runs it: (exit code, stdout, stderr)."""
    from nanochat.common import run_main as run_script_main
    from scripts import lora

    code = 0
    try:
        run_script_main(lambda: lora.main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_merge_cli_and_info(lab, monkeypatch, capsys):
    base, env = str(lab["base"]), lab["env"]
    sft(lab, monkeypatch, "m", "--num-iterations", 2)
    out = run_script("scripts.lora", "merge", "--source", "sft", "--model-tag", "m", env=env).stdout  # the real command line
    assert "m-merged" in out
    step_dir = os.path.join(checkpoint_dir("sft", "m-merged", base), "step_000002")
    assert os.path.isfile(os.path.join(step_dir, "model.pt")) and not load_meta(checkpoint_dir("sft", "m-merged", base), 2).get("lora")
    code, _, err = lora_cli(capsys, "merge", "--source", "sft", "--model-tag", "m")
    assert code == 1 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = lora_cli(capsys, "merge", "--source", "mid", "--model-tag", "m")
    assert code == 1 and "not a LoRA checkpoint" in err
    adapter = os.path.join(checkpoint_dir("sft", "m", base), "step_000002")
    code, info, _ = lora_cli(capsys, "info", adapter)
    assert code == 0 and "rank 4" in info and "q,v,o,fc" in info and "5,632" in info  # 2 layers x r 4 x ((64 + 64) x 3 + (64 + 256))
    code, _, err = lora_cli(capsys, "info", base)
    assert code == 1 and "adapter_config.json" in err

    # the merged checkpoint equals the LoRA checkpoint, which equals mid + --lora DIR
    merged, _ = load_weights("sft", "m-merged", 2, "cpu", base_dir=base)
    lora, _ = load_weights("sft", "m", 2, "cpu", base_dir=base, merge=False)
    plus, _ = load_weights("mid", "t", 1, "cpu", base_dir=base)
    load_adapter(adapter, plus)
    idx = tokens(T=20) % TOK.vocab_size
    with torch.no_grad():
        a, b, c = merged.eval()(idx), lora.eval()(idx), plus.eval()(idx)
    assert (a - b).abs().max() <= 1e-5 and torch.equal(b, c)
    assert len(lora_parameters(lora)) == 2 * 4 * TINY.n_layer

    # chat_cli: mid + --lora DIR answers as the LoRA checkpoint does; a directory that is no adapter is one line
    ask = ["-p", "red blue?", "--max-tokens", 8, "--temperature", 0, "--device-type", "cpu"]
    via_flag = run_script("scripts.chat_cli", "--source", "mid", "--model-tag", "t", "--lora", adapter, *ask, env=env).stdout
    via_ckpt = run_script("scripts.chat_cli", "--source", "sft", "--model-tag", "m", *ask, env=env).stdout
    assert via_flag.splitlines()[-2:] == via_ckpt.splitlines()[-2:] and "Assistant:" in via_flag
    with pytest.raises(NanochatError, match="no adapter_config.json"):
        load_model("mid", "cpu", model_tag="t", base_dir=base, lora=base)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tasks", "gsm8k")), reason="needs ../shared/data")
@pytest.mark.parametrize("script", ["chat_rl", "chat_rsft"])
def test_rl_and_rsft_train_an_adapter_through_the_engine(tmp_path, monkeypatch, script):
    from scripts import chat_rl, chat_rsft

    env = make_sft_base(tmp_path / "base")
    argv = ["--questions-per-step", 2, "--num-samples", 4, "--max-new-tokens", 12, "--eval-every", -1, "--eval-problems", 1, "--eval-samples", 2,
            "--device-batch-size", 3, "--num-iterations", 2, "--lora-rank", 2, "--lora-lr", 0.05] + (["--kl-coef", 0.05] if script == "chat_rl" else [])
    run_main({"chat_rl": chat_rl, "chat_rsft": chat_rsft}[script].main, argv, env, monkeypatch)
    stage = "rl" if script == "chat_rl" else "rsft"
    step_dir = os.path.join(checkpoint_dir(stage, "t", str(tmp_path / "base")), "step_000002")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(step_dir)) and "model.pt" not in os.listdir(step_dir)
    parent, _ = load_weights("sft", "t", 5, "cpu", base_dir=str(tmp_path / "base"))
    tuned, _ = load_weights(stage, "t", 2, "cpu", base_dir=str(tmp_path / "base"), merge=False)
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in tuned.state_dict().items() if "lora_" not in k)
