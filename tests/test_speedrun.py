"""
speedrun.sh as a rented node runs it, on a CPU:

- the bare-node set-up (runs/setup.sh): its prerequisite checks in a clean environment (PATH holds
  only the tools a case allows, HOME is a temp dir), one line each, and speedrun.sh stopping at a
  missing prerequisite before it makes or writes anything;
- the whole recipe at toy scale with NPROC=2 (torchrun, gloo) on the real data in ../shared/data:
  every stage that speedrun.sh launches runs on two ranks and the report card comes out; base
  training's losses against a single-process run with the same global batch.
"""

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from helpers.scripts_util import REPO, SHARED_DATA, read_metrics

PY_TAG = "cp%d%d" % sys.version_info[:2]


# ------------------------------------------------------------------------------------------------
# The prerequisite checks of runs/setup.sh in a clean environment


@pytest.fixture
def bare(tmp_path):
    """A copy of the set-up scripts in an empty repo, a bin dir that is the whole PATH, an empty HOME.
    bare.tool(name, script) puts a tool on PATH; bare.python(...) a python3 (this interpreter, seen
    through an optional PYTHONPATH dir that fakes what the case needs)."""
    repo = tmp_path / "repo"
    (repo / "runs").mkdir(parents=True)
    for f in ("speedrun.sh", "runs/setup.sh", "runs/stages.sh"):
        shutil.copy(os.path.join(REPO, f), repo / f)
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    for tool in ("bash", "sh", "dirname", "cat"):  # what a bare image has anyway
        os.symlink(shutil.which(tool), bin_dir / tool)

    class Bare:
        def __init__(self):
            self.repo, self.bin, self.home, self.tmp = repo, bin_dir, home, tmp_path

        def tool(self, name, script="exit 0", where=None):
            path = (where or bin_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"#!{bin_dir}/sh\n{script}\n")
            path.chmod(0o755)

        def python(self, sitedir=None):
            env = f"PYTHONPATH={shlex.quote(str(sitedir))} " if sitedir else ""
            self.tool("python3", f'{env}exec {shlex.quote(sys.executable)} "$@"')

        def rust(self, where=None):
            self.tool("cargo", 'echo "cargo 1.80.0 (fake)"', where)
            self.tool("rustc", 'echo "rustc 1.80.0 (fake)"', where)

        def run(self, *argv, **env):
            e = {"PATH": str(bin_dir), "HOME": str(home), **env}
            return subprocess.run([str(bin_dir / "bash"), *argv], cwd=repo, env=e, capture_output=True, text=True, timeout=60)

        def check(self, **env):
            return self.run("runs/setup.sh", "--check", **env)

    return Bare()


def lines(proc):
    return (proc.stdout + proc.stderr).strip().splitlines()


def fake_site(tmp_path, name, code):
    """A PYTHONPATH dir whose module `name` (run before anything else asks) is `code`."""
    d = tmp_path / f"site-{name}"
    d.mkdir()
    (d / f"{name}.py").write_text(code)
    return d


def fake_wheel(directory, tag=PY_TAG, with_extension=True):
    """A file laid out like `maturin build --release` output (editable wheels hold only a .pth)."""
    directory.mkdir(exist_ok=True)
    path = directory / f"nanochat-0.1.0-{tag}-{tag}-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("nanochat/__init__.py", "")
        z.writestr(f"nanochat_bpe/_core.{tag}-x86_64-linux-gnu.so" if with_extension else "nanochat.pth", "x")
    return path


def test_setup_check_all_present(bare):
    bare.python()
    bare.rust()
    bare.tool("cc")
    proc = bare.check()
    assert proc.returncode == 0, lines(proc)
    v = "%d.%d.%d" % sys.version_info[:3]
    assert lines(proc) == [
        f"setup: python3: {bare.bin}/python3 (Python {v}) with venv: ok",
        "setup: Rust: cargo 1.80.0 (fake), rustc 1.80.0 (fake): ok",
        f"setup: C linker: {bare.bin}/cc: ok",
    ]


def test_setup_check_python(bare, tmp_path):
    proc = bare.check()
    assert proc.returncode == 1
    assert lines(proc) == ["setup: python3: not found: install Python >= 3.10 with venv (Ubuntu: sudo apt-get install -y python3 python3-venv)"]

    bare.python(fake_site(tmp_path, "sitecustomize", "import sys\nsys.version_info = (3, 8, 10, 'final', 0)\n"))
    proc = bare.check()
    assert proc.returncode == 1
    (line,) = lines(proc)
    assert line.startswith(f"setup: python3: {bare.bin}/python3 is Python 3.8.10; nanochat needs >= 3.10"), line

    # Debian and Ubuntu without python3-venv: the venv module is there, ensurepip is not
    bare.python(fake_site(tmp_path, "ensurepip", "raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n"))
    proc = bare.check()
    assert proc.returncode == 1
    v = "%d.%d" % sys.version_info[:2]
    assert lines(proc) == [f"setup: python3: {bare.bin}/python3 (Python {v}.{sys.version_info[2]}) has no venv/ensurepip module: sudo apt-get install -y python{v}-venv"]


def test_setup_check_rust(bare):
    bare.python()
    bare.tool("cc")
    proc = bare.check(NANOCHAT_INSTALL_RUST="0")
    assert proc.returncode == 1
    assert lines(proc)[1] == "setup: Rust: cargo not found and NANOCHAT_INSTALL_RUST=0: install Rust (https://rustup.rs), or pass a prebuilt wheel as NANOCHAT_WHEEL=path (maturin build --release)"

    proc = bare.check()  # allowed to install, but nothing to fetch rustup with
    assert proc.returncode == 1
    assert lines(proc)[1] == "setup: Rust: cargo not found, and no curl to install it with rustup: sudo apt-get install -y curl, install Rust (https://rustup.rs), or pass NANOCHAT_WHEEL=path"

    bare.tool("curl")
    proc = bare.check()
    assert proc.returncode == 0, lines(proc)
    assert lines(proc)[1] == "setup: Rust: cargo not found: setup installs it with rustup into ~/.cargo (NANOCHAT_INSTALL_RUST=0 to refuse): ok"

    bare.rust(where=bare.home / ".cargo" / "bin")  # where rustup puts it, not on PATH in a non-login shell
    proc = bare.check(NANOCHAT_INSTALL_RUST="0")
    assert proc.returncode == 0 and lines(proc)[1] == "setup: Rust: cargo 1.80.0 (fake), rustc 1.80.0 (fake): ok", lines(proc)

    (bare.bin / "cc").unlink()
    proc = bare.check()
    assert proc.returncode == 1 and len(lines(proc)) == 3
    assert lines(proc)[2] == "setup: C linker: cc not found (rustc links the extension with it): sudo apt-get install -y build-essential, or pass NANOCHAT_WHEEL=path"


def test_setup_check_prebuilt_wheel(bare, tmp_path):
    bare.python()  # and neither Rust nor cc: the wheel needs neither
    wheel = fake_wheel(tmp_path)
    proc = bare.check(NANOCHAT_WHEEL=str(wheel))
    assert proc.returncode == 0, lines(proc)
    assert len(lines(proc)) == 2 and lines(proc)[1] == f"setup: Rust: not needed, prebuilt wheel {wheel}: ok"

    for path, message in (
        (tmp_path / "missing.whl", "no such file (make one with: maturin build --release)"),
        (fake_wheel(tmp_path, tag="cp39"), f"built for cp39, but python3 here is {PY_TAG}: build it with maturin build --release -i python3.{sys.version_info[1]}"),
        (fake_wheel(tmp_path / "editable", with_extension=False), "holds no nanochat_bpe/_core extension (an editable wheel? use maturin build --release)"),
    ):
        proc = bare.check(NANOCHAT_WHEEL=str(path))
        assert proc.returncode == 1
        assert lines(proc)[1:] == [f"setup: NANOCHAT_WHEEL={path}: {message}"]


def installable_wheel(directory):
    """A wheel pip installs offline: the layout of `maturin build --release` output (the extension
    a stand-in file), no dependencies."""
    directory.mkdir(exist_ok=True)
    path = directory / f"nanochat-0.1.0-{PY_TAG}-{PY_TAG}-linux_x86_64.whl"
    files = {
        "nanochat/__init__.py": b"",
        f"nanochat_bpe/_core.{PY_TAG}-x86_64-linux-gnu.so": b"not a real extension",
        "nanochat-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: nanochat\nVersion: 0.1.0\nProvides-Extra: dev\n",
        "nanochat-0.1.0.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {PY_TAG}-{PY_TAG}-linux_x86_64\n".encode(),
    }
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}" for name, data in files.items()]
    files["nanochat-0.1.0.dist-info/RECORD"] = ("\n".join(record + ["nanochat-0.1.0.dist-info/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_setup_from_bare_python_with_a_wheel(bare, tmp_path):
    """The whole set-up, offline, on a node with python3 and nothing else: the venv, the prebuilt wheel
    installed into it (no Rust, no C compiler), its extension put beside the sources; a second run
    finds .venv up to date and installs nothing."""
    bare.python()
    shutil.copy(os.path.join(REPO, "pyproject.toml"), bare.repo)
    wheel = installable_wheel(tmp_path / "wheels")
    env = {"NANOCHAT_WHEEL": str(wheel), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = bare.run("-c", "source runs/setup.sh && command -v python", **env)
    assert proc.returncode == 0, lines(proc)
    assert lines(proc)[:2] == [f"setup: python3: {bare.bin}/python3 (Python {'%d.%d.%d' % sys.version_info[:3]}) with venv: ok",
                               f"setup: Rust: not needed, prebuilt wheel {wheel}: ok"]
    assert lines(proc)[-2:] == ["setup: installed into .venv", str(bare.repo / ".venv" / "bin" / "python")]  # and activated
    assert (bare.repo / "nanochat_bpe" / f"_core.{PY_TAG}-x86_64-linux-gnu.so").read_bytes() == b"not a real extension"
    assert list((bare.repo / ".venv").glob("lib/python3.*/site-packages/nanochat-0.1.0.dist-info"))
    proc = bare.run("-c", "source runs/setup.sh", **env)
    assert proc.returncode == 0 and lines(proc) == ["setup: .venv is up to date"], lines(proc)
    (bare.repo / "pyproject.toml").write_text((bare.repo / "pyproject.toml").read_text() + "\n# a new dependency\n")
    proc = bare.run("-c", "source runs/setup.sh", **env)  # what it was made from changed: installed again
    assert proc.returncode == 0 and lines(proc)[-1] == "setup: installed into .venv", lines(proc)


def test_speedrun_stops_at_a_missing_prerequisite(bare):
    """On a node without python3, speedrun.sh says so in one line and makes nothing: no .venv, no
    base dir, no rustup."""
    bare.tool("curl", f"touch {bare.tmp}/curl-was-called")
    proc = bare.run("speedrun.sh")
    assert proc.returncode == 1
    assert lines(proc) == ["setup: python3: not found: install Python >= 3.10 with venv (Ubuntu: sudo apt-get install -y python3 python3-venv)"]
    assert not (bare.repo / ".venv").exists() and not (bare.home / ".cache").exists()
    assert not (bare.tmp / "curl-was-called").exists()


# ------------------------------------------------------------------------------------------------
# speedrun.sh with NPROC=2 on CPU

HAS_DATA = os.path.isdir(os.path.join(SHARED_DATA, "pretrain"))

# The recipe at toy scale (runs/runcpu.sh's variables, smaller): depth 2, vocab 1024, seq_len 64,
# a few steps per stage, 2 items per evaluation. Base: 8 rows x 64 tokens x 2 ranks = the 1,024-token
# batch, no accumulation; the single-process reference accumulates 2 micro-batches of 8 rows.
BASE_ARGS = "--depth 2 --max-seq-len 64 --device-batch-size 8 --total-batch-size 1024 --num-iterations 6 --eval-every 3 --eval-tokens 2048 --save-every 3 --num-prompts 1"
TOY = {
    "NPROC": "2", "DEPTH": "2", "SKIP_RL": "0", "GPU_HOUR_PRICE": "0",
    "TOK_ARGS": "--max-chars 2000000 --vocab-size 1024",
    "BASE_ARGS": BASE_ARGS,
    "BASE_EVAL_ARGS": "--max-per-task 2 --split-tokens 2048 --device-batch-size 8 --num-samples 1 --sample-tokens 8",
    "MID_ARGS": "--max-seq-len 64 --device-batch-size 8 --total-batch-size 1024 --num-iterations 3 --val-conversations 8",
    "SFT_ARGS": "--max-seq-len 64 --device-batch-size 4 --total-batch-size 512 --num-iterations 3 --val-conversations 8 --eval-every -1",
    "RL_ARGS": "--num-iterations 2 --questions-per-step 2 --num-samples 2 --max-new-tokens 16 --device-batch-size 4 --eval-every -1 --eval-problems 2 --eval-samples 2",
    "CHAT_EVAL_ARGS": "--max-problems 2 --max-new-tokens 16 --batch-size 2",
}
LAUNCHED = {"base_train": "base", "base_eval": None, "mid_train": "mid", "chat_eval_mid": None, "chat_sft": "sft", "chat_eval_sft": None, "chat_rl": "rl", "chat_eval_rl": None}
STAGES = ["tok_train", "tok_eval", *LAUNCHED]


def stage_env(base_dir, **extra):
    """This interpreter's environment for speedrun.sh and the stages: its bin dir (python, torchrun)
    first on PATH, no set-up (NANOCHAT_SETUP=0), the shared data root, no torchrun or nanochat
    variables from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"], NANOCHAT_SETUP="0", NANOCHAT_BASE_DIR=str(base_dir),
               NANOCHAT_DATA_ROOT=SHARED_DATA, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speedrun")
    t0 = time.time()
    proc = subprocess.run(["bash", os.path.join(REPO, "speedrun.sh")], env=stage_env(tmp / "base", **TOY), capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    print(f"speedrun.sh NPROC=2: {wall:.0f}s")
    assert proc.returncode == 0, f"speedrun.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {"base": tmp / "base", "tmp": tmp, "out": proc.stdout, "wall": wall}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data")
def test_speedrun_two_processes(speedrun):
    base, out = speedrun["base"], speedrun["out"]
    assert "setup: NANOCHAT_SETUP=0: using" in out
    # every stage ran to its marker; the launched ones under torchrun with 2 processes
    times = [line.split("\t")[0] for line in (base / "stages" / "times.tsv").read_text().splitlines()]
    assert times == STAGES
    for name, stage in LAUNCHED.items():
        m = re.search(rf"^== \[{name}\] launch (scripts\.\w+)", out, re.M)
        assert m and f"== torchrun --standalone --nproc_per_node=2 -m {m.group(1)}" in out[m.end():].split("\n", 2)[1], name
        if stage:  # a training run: two ranks in its record, one optimizer shard each in its checkpoints
            (tag,) = os.listdir(base / "checkpoints" / stage)
            run = json.loads((base / "checkpoints" / stage / tag / "run" / "run.json").read_text())
            assert run["world_size"] == 2 and run["status"] == "done", (stage, run["world_size"], run["status"])
            last = sorted((base / "checkpoints" / stage / tag).glob("step_*"))[-1]
            assert sorted(p.name for p in last.glob("optim_rank*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"], last
    # the evaluations split their items over the ranks: each rank scored one of the two problems
    assert len(re.findall(r"^  1/1 problems (scored|generated)", out, re.M)) == 3 * 6
    # the report card: every stage in its table, every evaluation in its columns
    report = (base / "report" / "report.md").read_text()
    for name in STAGES:
        assert re.search(rf"^\| {name} \| \d+h\d\dm\d\ds \|", report, re.M), name
    assert re.search(r"^\| CORE \| -?\d\.\d{4} \|", report, re.M) and re.search(r"^\| ChatCORE \| - \|( -?\d\.\d{4} \|){3}$", report, re.M)
    assert f"== report: {base}/report/report.md" in out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data")
def test_base_losses_match_one_process(speedrun):
    """Base training on 2 ranks against 1 process accumulating 2 micro-batches, with the same flags,
    tokenizer and data: the same global batch at every step, so the same losses to 1e-5."""
    single = speedrun["tmp"] / "single"
    shutil.copytree(speedrun["base"] / "tokenizer", single / "tokenizer")
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *BASE_ARGS.split()], cwd=REPO, env=stage_env(single, OMP_NUM_THREADS="2"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 rows x 64 tokens x 1 ranks x 2 accumulation steps" in proc.stdout
    two = [r["loss"] for r in read_metrics(speedrun["base"] / "checkpoints" / "base" / "d2" / "run" / "metrics.jsonl") if "loss" in r]
    one = [r["loss"] for r in read_metrics(single / "checkpoints" / "base" / "d2" / "run" / "metrics.jsonl") if "loss" in r]
    assert len(two) == len(one) == 6
    assert max(abs(a - b) for a, b in zip(two, one)) < 1e-5, (two, one)
