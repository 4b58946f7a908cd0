"""--config FILE for every training stage (nanochat/training.py load_config / parse_run_args):
values as defaults, command-line flags win, one-line errors naming the file and key."""

import argparse
import json

import pytest

from nanochat.common import NanochatError
from nanochat.training import add_run_args, parse_run_args


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--algo", type=str, default="a", choices=["a", "b"])
    add_run_args(p, parent="base", eval_every=50)
    return p


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_values_are_defaults_and_flags_win(tmp_path):
    path = write(tmp_path, "c.yaml", "depth: 6\nnum-iterations: 30\ninit_lr_frac: 0.5\nresume: true\nalgo: b\n")
    args = parse_run_args(parser(), ["--config", path, "--depth", "8"])
    assert (args.depth, args.num_iterations, args.init_lr_frac, args.resume, args.algo) == (8, 30, 0.5, True, "b")
    assert args.eval_every == 50  # the stage's own default where the file says nothing
    assert args.config_values == {"depth": 6, "num_iterations": 30, "init_lr_frac": 0.5, "resume": True, "algo": "b"}
    same = parse_run_args(parser(), ["--config", write(tmp_path, "c.json", json.dumps({"depth": "6", "--num-iterations": 30}))])
    assert (same.depth, same.num_iterations) == (6, 30)  # strings are converted by the flag's type
    assert parse_run_args(parser(), []).config_values is None


@pytest.mark.parametrize("text, message", [
    ("depth: 6\nlearning_rate: 3\n", "c.yaml: unknown key 'learning_rate'"),
    ("depth: six\n", "c.yaml: key 'depth': 'six' is not a valid int"),
    ("algo: c\n", "c.yaml: key 'algo': 'c' is not one of a, b"),
    ("resume: 1\n", "c.yaml: key 'resume' takes true or false"),
    ("depth: [1, 2]\n", "c.yaml: key 'depth' takes one value"),
    ("- depth\n", "c.yaml: expected a mapping"),
    ("depth: 6\n  bad: indent\n", "c.yaml: not a valid config file"),
    ("num_iterations: 0\n", "--num-iterations 0 is out of range"),  # the shared range checks still apply
    ("dropout: 1.0\n", "--dropout 1.0 is out of range"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(NanochatError, match=message):
        parse_run_args(parser(), ["--config", write(tmp_path, "c.yaml", text)])


def test_missing_config_file(tmp_path):
    with pytest.raises(NanochatError, match="--config: no such file"):
        parse_run_args(parser(), ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("name, module", [("cpu_base.yaml", "scripts.base_train"), ("cpu_sft.yaml", "scripts.chat_sft"),
                                          ("reasoning_sft.yaml", "scripts.chat_sft"), ("speedrun_sft.yaml", "scripts.chat_sft"),
                                          ("cpu_sft_lora.yaml", "scripts.chat_sft")])
def test_example_configs_parse_with_their_stage(name, module):
    import importlib
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "configs", name)
    args = importlib.import_module(module).parse_args(["--config", path])
    assert args.config_values and all(str(getattr(args, k)) == str(v) for k, v in args.config_values.items())  # device_batch_size: "16" -> 16
