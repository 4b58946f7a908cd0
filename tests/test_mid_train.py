"""
Midtraining: best-fit packing and the loss mask on hand-written conversations (nanochat/chat_data.py),
disjoint ranks, exact loader resume; and scripts/mid_train.py -> scripts/chat_eval.py as real
subprocesses on a tiny random GPT: resume after an interruption reproduces the uninterrupted run.
"""

import json
import os

import pytest
import torch

from conftest import byte_tokenizer
from helpers.scripts_util import SHARED_DATA, make_env, read_metrics, run_script
from nanochat.chat_data import ConversationLoader, estimate_tokens, fill_row, rows_to_batch
from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig

TOK = byte_tokenizer()
S = TOK.special_tokens


def conv(user, *assistant):
    """A user turn and one assistant reply (a str, or (type, text) parts)."""
    content = assistant[0] if len(assistant) == 1 and isinstance(assistant[0], str) else [{"type": t, "text": x} for t, x in assistant]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": content}]}


CONVERSATIONS = [
    conv("hi", "hello!"),
    conv("2+2?", ("text", "It is "), ("python", "2+2"), ("python_output", "4"), ("text", "4.")),
    conv("name?", "I am nanochat."),
    conv("a much longer question about the weather today", "Sunny and warm, with a light breeze."),
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]},
    conv("ok", "k"),
    conv("spell cat", "c,a,t"),
]


def split_row(ids):
    """The conversations in a packed row: the pieces starting at each <|bos|>, padding dropped."""
    starts = [i for i, t in enumerate(ids) if t == TOK.bos_token_id] + [len(ids)]
    pieces = []
    for a, b in zip(starts, starts[1:]):
        piece = ids[a:b]
        if len(piece) > 1:  # a lone <|bos|> is padding
            pieces.append(piece)
    return pieces


# ------------------------------------------------------------------------------------------------ fill_row


def test_fill_row_best_fit_then_padding():
    buffer = [(k, [TOK.bos_token_id] + [65] * (n - 1), [0] + [1] * (n - 1)) for k, n in enumerate([5, 3, 8, 2, 3])]
    ids, mask, keys, n_pad = fill_row(buffer, 10, pad_id=TOK.bos_token_id)
    assert keys == [2, 3]  # the longest that fits (8), then the longest of what still fits (2): full row
    assert n_pad == 0 and len(ids) == len(mask) == 10
    ids, mask, keys, n_pad = fill_row(buffer, 10, pad_id=TOK.bos_token_id)
    assert keys == [0, 1]  # 5, then 3 (ties between the two 3s: the oldest); room 2 left, nothing fits
    assert n_pad == 2 and mask[-2:] == [0, 0] and ids[-2:] == [TOK.bos_token_id] * 2
    assert [k for k, _, _ in buffer] == [4]
    fill_row(buffer, 10, pad_id=0)
    ids, mask, keys, n_pad = fill_row(buffer, 10, pad_id=0)  # empty buffer: all padding
    assert keys == [] and n_pad == 10 and not any(mask)
    with pytest.raises(ValueError):
        fill_row([(0, [1] * 11, [1] * 11)], 10, pad_id=0)


def test_rows_to_batch_masks_targets():
    ids, mask = [10, 11, 12, 13, 14], [0, 0, 1, 1, 0]
    x, y = rows_to_batch([(ids, mask)])
    assert x.tolist() == [[10, 11, 12, 13]]
    assert y.tolist() == [[-1, 12, 13, -1]]
    assert x.dtype == y.dtype == torch.int64


# ------------------------------------------------------------------------------------------------ loader


def all_rows(loader):
    """Every (inputs, targets) row of a finite loader, as lists."""
    return [(x.tolist(), y.tolist()) for xs, ys in loader for x, y in zip(xs, ys)]


def test_loader_packs_every_conversation_once_with_its_mask():
    T = 64
    loader = ConversationLoader(CONVERSATIONS, list(range(len(CONVERSATIONS))), TOK, B=2, T=T, buffer_size=4, num_epochs=1)
    rendered = [TOK.render_conversation(c, max_tokens=T + 1) for c in CONVERSATIONS]
    assert len(TOK.render_conversation(CONVERSATIONS[3])[0]) > T + 1  # one conversation is cut to the row
    found, n_rows = [], 0
    for x, y in all_rows(loader):
        n_rows += 1
        assert len(x) == len(y) == T and x[0] == TOK.bos_token_id  # every row starts a conversation
        starts = [i for i, t in enumerate(x) if t == TOK.bos_token_id] + [T]
        for a, b in zip(starts, starts[1:]):
            if b - a == 1 and y[a] == -1:
                continue  # padding (<|bos|> inputs, no targets)
            # the conversation this piece of the row is (a conversation at the end of the row may
            # have its last token only as the last target)
            match = [k for k, (ids, _) in enumerate(rendered) if ids[: b - a] == x[a:b] and len(ids) <= b - a + (b == T)]
            assert len(match) == 1, x[a:b]
            ids, mask = rendered[match[0]]
            for t in range(a, b):
                j = t - a + 1  # the target of position t is token j of the conversation
                expected = ids[j] if j < len(ids) and mask[j] else -1
                assert y[t] == expected, (t, y[t], expected)
            found.append(match[0])
    assert sorted(found) == list(range(len(CONVERSATIONS)))  # each conversation exactly once
    assert n_rows < len(CONVERSATIONS)  # and packed: several conversations share rows


def test_loader_trains_tool_calls_not_tool_outputs():
    c = CONVERSATIONS[1]
    x, y = next(ConversationLoader([c], [0], TOK, B=1, T=64, num_epochs=1))
    ids = x[0].tolist() + [y[0, -1].item()]
    trained = {ids[t + 1] for t in range(64) if y[0, t] != -1}
    assert S["<|python_start|>"] in trained and S["<|python_end|>"] in trained and S["<|assistant_end|>"] in trained
    assert S["<|output_start|>"] not in trained and S["<|output_end|>"] not in trained
    out = ids.index(S["<|output_start|>"])
    assert y[0, out - 1] == -1 and y[0, out] == -1  # <|output_start|> and the output "4" are not targets
    assert ids[:2] == [TOK.bos_token_id, S["<|user_start|>"]]
    assert (y[0, : ids.index(S["<|assistant_start|>"])] == -1).all()  # nothing before the reply is trained


def test_loader_skips_conversations_without_trained_tokens():
    long_user = conv("x" * 100, "ok")
    loader = ConversationLoader([long_user, CONVERSATIONS[0]], [0, 1], TOK, B=4, T=32, num_epochs=1)
    rows = all_rows(loader)
    assert loader.skipped == 1 and len(rows) == 1


def test_ranks_take_disjoint_conversations():
    indices = list(range(len(CONVERSATIONS)))
    pieces = []
    for rank in range(2):
        loader = ConversationLoader(CONVERSATIONS, indices, TOK, B=1, T=64, rank=rank, world_size=2, num_epochs=1)
        assert loader.my_indices == indices[rank::2]
        pieces.append(sorted(tuple(p) for x, _ in all_rows(loader) for p in split_row(x)))
    assert not set(pieces[0]) & set(pieces[1])
    assert len(pieces[0]) + len(pieces[1]) == len(CONVERSATIONS)


def test_loader_resume_is_exact():
    indices = [3, 0, 6, 1, 5, 2, 4]
    reference = ConversationLoader(CONVERSATIONS, indices, TOK, B=2, T=24, buffer_size=3)
    batches = [next(reference) for _ in range(9)]  # > one epoch: the resumed loader must cross it too
    first = ConversationLoader(CONVERSATIONS, indices, TOK, B=2, T=24, buffer_size=3)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ConversationLoader(CONVERSATIONS, indices, TOK, B=2, T=24, buffer_size=3, state=state)
    for x, y in batches[4:]:
        rx, ry = next(resumed)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.epoch >= 1
    with pytest.raises(NanochatError, match="conversations"):
        ConversationLoader(CONVERSATIONS, indices[::-1], TOK, B=2, T=24, buffer_size=3, state=state)
    with pytest.raises(NanochatError, match="seq_len"):
        ConversationLoader(CONVERSATIONS, indices, TOK, B=2, T=32, buffer_size=3, state=state)


def test_estimate_tokens_is_exact_on_a_full_sample():
    indices = list(range(len(CONVERSATIONS)))
    exact = sum(len(TOK.render_conversation(c, max_tokens=33)[0]) for c in CONVERSATIONS)
    assert estimate_tokens(CONVERSATIONS, indices, TOK, 33) == exact
    assert estimate_tokens(CONVERSATIONS, indices, TOK, 33, sample=3) > 0


# ------------------------------------------------------------------------------------------------ scripts


needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tasks")), reason="needs ../shared/data")
MID_ARGS = ["--device-batch-size", 2, "--total-batch-size", 512, "--num-iterations", 4, "--val-conversations", 8, "--eval-every", 2, "--buffer-size", 16]


@pytest.fixture(scope="module")
def chat_env(tmp_path_factory):
    """A tmp base dir with a byte tokenizer and a tiny random base GPT (tag "t"), a small recipe."""
    tmp = tmp_path_factory.mktemp("mid")
    base = tmp / "base"
    TOK.save(base / "tokenizer")
    config = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights(seed=0)
    save_checkpoint(checkpoint_dir("base", "t", str(base)), 0, model.state_dict(), None, {"stage": "base", "model_tag": "t", "step": 0, "model_config": config.to_dict()})
    recipe = tmp / "mid.json"
    chat = os.path.join(SHARED_DATA, "chat", "self_instruct_human.jsonl")
    recipe.write_text(json.dumps({"seed": 3, "tasks": [{"task": "CustomJSON", "args": {"path": chat}, "count": 60}, {"task": "SpellingBee", "args": {"size": 40}}, {"task": "GSM8K", "args": {"split": "train"}, "count": 20}]}))
    # one thread: the model is tiny, and tests share the cores
    env = make_env(base, OMP_NUM_THREADS=1, NANOCHAT_TASKS_DIR=os.path.join(SHARED_DATA, "tasks"), NANOCHAT_CHAT_DIR=os.path.join(SHARED_DATA, "chat"), NANOCHAT_WORDS_FILE=os.path.join(SHARED_DATA, "words", "words_alpha.txt"))
    return {"env": env, "base": base, "recipe": recipe}


def mid_losses(base, tag):
    rows = read_metrics(os.path.join(checkpoint_dir("mid", tag, str(base)), "run", "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.slow
@needs_data
def test_mid_train_resume_then_chat_eval(chat_env):
    env, base, recipe = chat_env["env"], chat_env["base"], chat_env["recipe"]
    # uninterrupted reference, under another tag (a copy of the base checkpoint)
    os.symlink(checkpoint_dir("base", "t", str(base)), checkpoint_dir("base", "ref", str(base)))
    run_script("scripts.mid_train", *MID_ARGS, "--recipe", recipe, "--model-tag", "ref", env=env)
    stopped = run_script("scripts.mid_train", *MID_ARGS, "--recipe", recipe, "--model-tag", "t", "--stop-at-step", 2, env=env, check=False)
    assert stopped.returncode == 143 and "checkpoint saved at step 2" in stopped.stdout
    run_script("scripts.mid_train", *MID_ARGS, "--recipe", recipe, "--model-tag", "t", "--resume", env=env)
    ref, ref_val = mid_losses(base, "ref")
    cut, cut_val = mid_losses(base, "t")
    assert sorted(ref) == sorted(cut) == [1, 2, 3, 4]
    for step in ref:
        assert abs(ref[step] - cut[step]) <= 1e-6, (step, ref[step], cut[step])
    assert ref_val == pytest.approx(cut_val, abs=1e-6) and len(ref_val) == 3  # steps 0, 2, 4
    assert ref[4] < ref[1]  # it learns (the chat format is easy to pick up)
    with open(os.path.join(checkpoint_dir("mid", "t", str(base)), "step_000004", "meta.json")) as f:
        meta = json.load(f)
    assert meta["model_tag"] == "t" and meta["parent"] == {"stage": "base", "model_tag": "t", "step": 0} and meta["stage"] == "mid"
    assert meta["resolved"]["num_iterations"] == 4 and meta["resolved"]["max_seq_len"] == 128

    # chat_eval on the midtrained model: every task, a few problems each
    proc = run_script("scripts.chat_eval", "--source", "mid", "--model-tag", "t", "--max-problems", 2, "--max-new-tokens", 8, "--batch-size", 2, env=env)
    with open(base / "report" / "chat-eval-mid.json") as f:
        report = json.load(f)
    tasks = report["tasks"]
    assert list(tasks) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
    assert all(r["problems"] == 2 for r in tasks.values())
    assert tasks["MMLU"]["chance"] == 0.25 and tasks["GSM8K"]["chance"] == 0.0
    for r in tasks.values():
        assert r["centered"] == pytest.approx((r["accuracy"] - r["chance"]) / (1 - r["chance"]))
    assert report["chatcore"] == pytest.approx(sum(r["centered"] for r in tasks.values()) / 6)
    assert "ChatCORE" in proc.stdout and os.path.isfile(base / "report" / "chat-eval-mid.md")
    # the same model again, paired with the saved evaluation: the same problems, no difference anywhere
    proc = run_script("scripts.chat_eval", "--source", "mid", "--model-tag", "t", "--tasks", "ARC-Easy,GSM8K", "--max-problems", 2, "--max-new-tokens", 8, "--batch-size", 2, "--paired-with", "mid", env=env)
    with open(base / "report" / "chat-eval-mid.json") as f:
        paired = json.load(f)["paired"]["mid"]
    assert list(paired) == ["ARC-Easy", "GSM8K"]
    for rows in paired.values():
        assert rows[-1]["bucket"] == "all" and rows[-1]["problems"] == 2 and rows[-1]["diff"] == 0 and rows[-1]["fixed"] == rows[-1]["broke"] == 0
    assert "Paired with mid, on the problems both evaluated:" in proc.stdout and "| GSM8K | all | 2 |" in proc.stdout


@needs_data
def test_bad_inputs_are_errors_naming_the_flag(chat_env, monkeypatch):
    from scripts import chat_eval, mid_train

    for key in ("NANOCHAT_BASE_DIR", "NANOCHAT_TASKS_DIR", "NANOCHAT_CHAT_DIR", "NANOCHAT_WORDS_FILE"):
        monkeypatch.setenv(key, chat_env["env"][key])
    with pytest.raises(NanochatError, match="Nope"):
        chat_eval.main(["--source", "mid", "--tasks", "ARC-Easy,Nope"])
    with pytest.raises(NanochatError, match="--temperature"):
        chat_eval.main(["--source", "base", "--tasks", "GSM8K", "--num-samples", "4", "--max-problems", "1"])
    with pytest.raises(NanochatError, match="--paired-with rl: .*chat-eval-rl.json not found"):
        chat_eval.main(["--source", "mid", "--tasks", "ARC-Easy", "--paired-with", "rl"])
    with pytest.raises(NanochatError, match="--paired-with nope: expected stages of"):
        chat_eval.main(["--source", "mid", "--paired-with", "nope"])
    base = chat_env["base"]
    os.symlink(checkpoint_dir("base", "t", str(base)), checkpoint_dir("base", "bad", str(base)))
    with pytest.raises(NanochatError, match="--total-batch-size 500"):
        mid_train.main([str(a) for a in MID_ARGS] + ["--recipe", str(chat_env["recipe"]), "--total-batch-size", "500", "--model-tag", "bad"])
    # a finished run is not overwritten by accident (a one-step run of its own: mid/t comes from a slow test)
    os.symlink(checkpoint_dir("base", "t", str(base)), checkpoint_dir("base", "done", str(base)))
    done = [str(a) for a in MID_ARGS] + ["--recipe", str(chat_env["recipe"]), "--model-tag", "done", "--num-iterations", "1"]
    mid_train.main(done)
    with pytest.raises(NanochatError, match="mid/done holds a mid run .*--resume.*--overwrite"):
        mid_train.main(done)
    with pytest.raises(NanochatError, match="--resume: no mid checkpoint in .*mid.nope"):
        mid_train.main([str(a) for a in MID_ARGS] + ["--recipe", str(chat_env["recipe"]), "--model-tag", "nope", "--resume"])


@needs_data
def test_resume_if_exists_and_extending_the_horizon(chat_env, monkeypatch, capsys):
    import signal

    from scripts import mid_train

    for key in ("NANOCHAT_BASE_DIR", "NANOCHAT_TASKS_DIR", "NANOCHAT_CHAT_DIR", "NANOCHAT_WORDS_FILE"):
        monkeypatch.setenv(key, chat_env["env"][key])
    base = chat_env["base"]
    os.symlink(checkpoint_dir("base", "t", str(base)), checkpoint_dir("base", "grow", str(base)))
    argv = [str(a) for a in ["--device-batch-size", 2, "--total-batch-size", 512, "--buffer-size", 16, "--val-conversations", 0]]
    argv += ["--recipe", str(chat_env["recipe"]), "--model-tag", "grow", "--resume-if-exists"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # in-process: main() installs its SIGTERM/SIGINT handlers, put pytest's back afterwards
        mid_train.main(argv + ["--num-iterations", "1"])  # nothing to resume: starts from base
        assert "resumed from" not in capsys.readouterr().out
        mid_train.main(argv + ["--num-iterations", "2"])  # resumes at step 1 and extends the run to 2
        assert "at step 1" in capsys.readouterr().out
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    losses, _ = mid_losses(base, "grow")
    assert sorted(losses) == [1, 2]
