"""
scripts/launch_shadeform.sh against a local fake of the Shadeform API (tests/helpers/fake_shadeform.py)
and fake ssh/rsync on PATH that turn a local directory into the "instance": the whole launch
(type choice, SSH key, create, pending -> active, upload, detached run, log streaming, download,
delete), and every failure path: a failing phase, bad API key, quota error, an instance that never
becomes active, no instance available, Ctrl-C, the --max-hours guard. After each, no instance may
be left running. The preflight (a phase without the earlier phases' files in --upload) refuses
before a single API call.
"""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers.fake_shadeform import FakeShadeform

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "scripts", "launch_shadeform.sh")
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyMaterialForTests0000000000000000 me@laptop"

STUB_SPEEDRUN = """#!/usr/bin/env bash
# stands in for speedrun.sh on the fake instance
echo "stub speedrun: PHASE=$PHASE NPROC=$NPROC DEPTH=${DEPTH:-} X=${X:-}"
echo "stub speedrun: wheel ${NANOCHAT_WHEEL:-none}"
mkdir -p "$NANOCHAT_BASE_DIR/report" "$NANOCHAT_BASE_DIR/checkpoints/base/d4"
echo "# report for $PHASE" > "$NANOCHAT_BASE_DIR/report/report.md"
echo weights > "$NANOCHAT_BASE_DIR/checkpoints/base/d4/model.pt"
for _ in $(seq 1 $((${STUB_SECONDS:-0} * 10))); do
    [ -f "$HOME/STOP" ] && exit 99  # the instance was deleted
    sleep 0.1
done
echo "stub speedrun: done"
exit ${STUB_RC:-0}
"""


def earlier_phases(directory, stages=("base", "mid", "sft"), tokenizer=True, report=True):
    """A base dir laid out like the --out of earlier launches: what the preflight looks for."""
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        (directory / "tokenizer").mkdir()
        (directory / "tokenizer" / "tokenizer.tiktoken").write_text("IQ== 0\n")
        (directory / "tokenizer" / "tokenizer.json").write_text("{}")
    for stage in stages:
        step = directory / "checkpoints" / stage / "d4" / "step_000010"
        step.mkdir(parents=True)
        (step / "model.pt").write_text("weights")
    if report:
        (directory / "report").mkdir()
        (directory / "report" / "base_train.json").write_text("{}")
    return directory


@pytest.fixture
def launch(tmp_path):
    """A copy of the launch script in a tiny repo (its speedrun.sh a stub), a fake machine directory,
    fake ssh/rsync (and python3) first on PATH, a throwaway SSH key pair, and an --upload dir with
    every earlier phase's files (passed unless a test gives its own --upload or upload=None)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "launch_shadeform.sh")
    (repo / "speedrun.sh").write_text(STUB_SPEEDRUN)
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    remote = tmp_path / "remote"
    remote.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ssh", "rsync"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.join(HERE, "helpers", "fake_shadeform.py")}" {tool} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    os.symlink(sys.executable, bin_dir / "python3")  # the script's JSON helper: this interpreter, no shims
    key = tmp_path / "id_test"
    key.write_text("not a real key\n")
    (tmp_path / "id_test.pub").write_text(PUBKEY + "\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHADEFORM", "NANOCHAT"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", HOME=str(home), FAKE_REMOTE_HOME=str(remote), FAKE_LOG=str(tmp_path / "fake.log"), SHADEFORM_API_KEY="test-key")
    earlier = earlier_phases(tmp_path / "earlier")

    class Launch:
        out = tmp_path / "out"

        def __init__(self):
            self.tmp, self.remote, self.env = tmp_path, remote, env

        def args(self, *extra, phase="base", upload=earlier):
            if upload and "--upload" not in extra:
                extra += ("--upload", upload)
            return ["bash", str(repo / "scripts" / "launch_shadeform.sh"), "--phase", phase, "--ssh-key", str(key), "--poll-seconds", "0.1", "--boot-timeout-min", "0.5", "--out", str(self.out), *map(str, extra)]

        def run(self, server, *extra, env=None, timeout=90, **kw):
            e = dict(self.env, SHADEFORM_API_URL=server.url if server else "http://127.0.0.1:9/v1", **(env or {}))
            return subprocess.run(self.args(*extra, **kw), env=e, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)

        def popen(self, server, *extra):
            e = dict(self.env, SHADEFORM_API_URL=server.url)
            # its own process group, as a terminal's foreground job: Ctrl-C reaches the group (killpg).
            # And SIGINT at its default, as a terminal starts it: a non-interactive bash cannot trap a
            # signal that was ignored when it started, and the test process may have inherited or
            # picked up an ignored SIGINT (in CI's full run it had: the launcher never saw Ctrl-C).
            return subprocess.Popen(self.args(*extra), env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                    start_new_session=True, preexec_fn=default_sigint)

        def tool_calls(self, tool):
            path = tmp_path / "fake.log"
            if not path.exists():
                return []
            return [c["argv"] for c in map(json.loads, path.read_text().splitlines()) if c["tool"] == tool]

    return Launch()


def assert_nothing_running(server):
    assert server.running() == [], server.running()
    for iid in server.instances:
        assert len(server.calls("POST", f"/v1/instances/{iid}/delete")) >= 1


def test_launch_runs_the_phase_streams_downloads_and_deletes(launch):
    upload = earlier_phases(launch.tmp / "previous", stages=(), report=False)  # the tokenizer: what base needs
    with FakeShadeform(launch.remote, active_after=2) as server:
        t0 = datetime.datetime.now(datetime.timezone.utc)
        proc = launch.run(server, "--upload", upload, "--env", "DEPTH=12", "--env", "X=it's a test", "--max-hours", 2)
        assert proc.returncode == 0, proc.stderr
        # the phase ran on the instance with the environment, and its log was streamed
        assert "stub speedrun: PHASE=base NPROC=8 DEPTH=12 X=it's a test" in proc.stdout
        assert "stub speedrun: wheel none" in proc.stdout  # no --wheel: the instance builds the crate
        assert "stub speedrun: done" in proc.stdout
        # the cheapest *available* 8xH100, with the key registered first
        (add,) = server.calls("POST", "/v1/sshkeys/add")
        assert add[2]["public_key"] == PUBKEY
        (create,) = server.calls("POST", "/v1/instances/create")
        body = create[2]
        assert (body["cloud"], body["region"], body["shade_instance_type"], body["shade_cloud"]) == ("datacrunch", "FIN-01", "H100x8", True)
        assert body["ssh_key_id"] == server.ssh_keys[0]["id"] and body["name"].startswith("nanochat-base-")
        deadline = datetime.datetime.fromisoformat(body["auto_delete"]["date_threshold"])
        assert datetime.timedelta(hours=2) < deadline - t0 < datetime.timedelta(hours=2, minutes=35)  # the server-side backstop
        (types,) = server.calls("GET", "/v1/instances/types")
        assert "gpu_type=H100" in types[1] and "num_gpus=8" in types[1] and "available=true" in types[1]
        assert len(server.calls("GET", r"/v1/instances/inst-\d+/info")) >= 3  # pending twice, then active
        assert_nothing_running(server)
    # the repository and the earlier phase's files went up; results came back
    assert (launch.remote / "nanochat" / "speedrun.sh").exists() and not (launch.remote / "nanochat" / ".git").exists()
    assert (launch.remote / ".cache" / "nanochat" / "tokenizer" / "tokenizer.json").exists()
    assert (launch.out / "report" / "report.md").read_text() == "# report for base\n"
    assert (launch.out / "checkpoints" / "base" / "d4" / "model.pt").exists()
    assert "stub speedrun: done" in (launch.out / "launch-base.log").read_text()
    # the API key never appears on a command line
    for tool in ("ssh", "rsync"):
        assert launch.tool_calls(tool) and not any("test-key" in " ".join(argv) for argv in launch.tool_calls(tool))


def test_known_key_is_reused_and_cloud_region_pin_the_choice(launch):
    known = {"id": "key-7", "name": "laptop", "public_key": PUBKEY.rsplit(" ", 1)[0] + " other-comment", "is_default": True}
    wheel = launch.tmp / "nanochat-0.1.0-cp312-cp312-manylinux_2_34_x86_64.whl"
    wheel.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: the name and the file are what travel
    with FakeShadeform(launch.remote, ssh_keys=[known], active_after=0) as server:
        proc = launch.run(server, "--cloud", "lambdalabs", "--region", "us-west-2", "--download", "report", "--wheel", wheel, phase="sft")
        assert proc.returncode == 0, proc.stderr
        # the prebuilt wheel went up beside the repository, and speedrun.sh (runs/setup.sh) was told
        remote_wheel = launch.remote / "nanochat-wheels" / wheel.name
        assert remote_wheel.read_bytes() == wheel.read_bytes()
        assert f"stub speedrun: wheel {remote_wheel}" in proc.stdout
        assert server.calls("POST", "/v1/sshkeys/add") == []
        (create,) = server.calls("POST", "/v1/instances/create")
        assert (create[2]["cloud"], create[2]["region"], create[2]["ssh_key_id"]) == ("lambdalabs", "us-west-2", "key-7")
        assert "cloud=lambdalabs" in server.calls("GET", "/v1/instances/types")[0][1]
        assert_nothing_running(server)
    assert (launch.out / "report" / "report.md").exists() and not (launch.out / "checkpoints").exists()  # --download report


def test_failed_phase_returns_its_status_and_deletes(launch):
    with FakeShadeform(launch.remote, active_after=0) as server:
        proc = launch.run(server, "--env", "STUB_RC=3")
        assert proc.returncode == 3 and "finished with status 3" in proc.stderr
        assert_nothing_running(server)
    assert (launch.out / "launch-base.log").exists()  # the logs still come back


def test_bad_api_key_is_a_clear_error(launch):
    with FakeShadeform(launch.remote) as server:
        proc = launch.run(server, env={"SHADEFORM_API_KEY": "wrong"})
        assert proc.returncode == 1
        assert "rejected the API key" in proc.stderr and "HTTP 401" in proc.stderr and "SHADEFORM_API_KEY" in proc.stderr
        assert server.calls("POST", "/v1/instances/create") == [] and server.instances == {}


def test_quota_error_is_reported_and_nothing_is_left(launch):
    with FakeShadeform(launch.remote, create_error=(400, "Quota exceeded: at most 0 H100 instances for this account")) as server:
        proc = launch.run(server)
        assert proc.returncode == 1
        assert "Quota exceeded: at most 0 H100 instances" in proc.stderr and "HTTP 400" in proc.stderr
        assert server.instances == {} and launch.tool_calls("ssh") == []


def test_instance_that_never_becomes_active_is_deleted(launch):
    with FakeShadeform(launch.remote, never_active=True) as server:
        proc = launch.run(server, "--boot-timeout-min", 0.03)
        assert proc.returncode == 1 and "did not become active within 0.03 min" in proc.stderr and "last status: pending" in proc.stderr
        assert len(server.instances) == 1
        assert_nothing_running(server)
        assert launch.tool_calls("rsync") == []


def test_no_available_instance(launch):
    with FakeShadeform(launch.remote) as server:
        proc = launch.run(server, "--gpu", "B200")
        assert proc.returncode == 1 and "no 8x B200 instance available" in proc.stderr
        proc = launch.run(server, "--cloud", "hyperstack")  # offered but not available
        assert proc.returncode == 1 and "on hyperstack" in proc.stderr
        assert server.instances == {}


def default_sigint():
    """In the child before exec: SIGINT unblocked and at its default disposition."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, timeout=60):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def test_ctrl_c_deletes_the_instance(launch):
    with FakeShadeform(launch.remote, active_after=0) as server:
        proc = launch.popen(server, "--env", "STUB_SECONDS=60")
        log = launch.remote / ".cache" / "nanochat" / "launch-base.log"
        wait_for(lambda: log.exists() and "stub speedrun" in log.read_text())
        # Ctrl-C in a terminal signals the whole foreground group. A SIGINT to bash alone is dropped
        # when it arrives during a foreground command that does not die of it (bash's
        # wait-and-cooperative-exit rule), which made this test flaky.
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "interrupted" in err, err
        assert_nothing_running(server)
        exit_file = launch.remote / ".cache" / "nanochat" / "launch-base.exit"
        wait_for(lambda: exit_file.exists() and exit_file.read_text().strip() == "99", 10)  # the job saw its machine go away


@pytest.mark.slow
def test_max_hours_guard_stops_and_deletes(launch):
    with FakeShadeform(launch.remote, active_after=0) as server:
        proc = launch.run(server, "--env", "STUB_SECONDS=60", "--max-hours", 0.0015)  # 5.4 s: fires while the phase runs
        assert proc.returncode == 124 and "--max-hours 0.0015 reached" in proc.stderr, proc.stderr
        assert len(server.instances) == 1 and "streaming" in proc.stderr  # it stopped a running phase
        assert_nothing_running(server)


def test_dry_run_prints_everything_and_does_nothing(launch):
    with FakeShadeform(launch.remote) as server:
        proc = launch.run(server, "--env", "DEPTH=26", env={"SHADEFORM_API_KEY": ""}, phase="all")
        assert proc.returncode == 1 and "SHADEFORM_API_KEY is not set" in proc.stderr
        proc = launch.run(server, "--dry-run", "--env", "DEPTH=26", env={"SHADEFORM_API_KEY": ""}, phase="all")
        assert proc.returncode == 0, proc.stderr
        assert server.requests == [] and launch.tool_calls("ssh") == [] and launch.tool_calls("rsync") == []
        printed = [line for line in proc.stderr.splitlines() if line.startswith("+ ")]
        for needle in ("curl -X GET '" + server.url + "/instances/types?", "curl -X GET " + server.url + "/sshkeys", "/instances/create", "/info", "+ rsync -az --delete", "PHASE=all NPROC=8", "DEPTH=26", "/delete"):
            assert any(needle in line for line in printed), needle
        assert not any("test-key" in line for line in printed)


def test_bad_arguments(launch):
    for args, message in ((["--num-gpus", "0"], "--num-gpus 0"), (["--env", "1X=2"], "--env 1X=2"), (["--max-hours", "-1"], "--max-hours -1"), (["--download", "some"], "--download some")):
        proc = launch.run(None, *args)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
    proc = launch.run(None, phase="train")
    assert proc.returncode == 1 and "--phase train: expected one of all, tok, base, mid, sft, rl, eval" in proc.stderr


PREFLIGHT = {  # phase -> the one line without --upload
    "base": "--phase base needs the tokenizer: pass --upload <base dir with tokenizer/> (the --out of the earlier phases' launch)",
    "mid": "--phase mid needs the tokenizer and the base checkpoint: pass --upload <base dir with tokenizer/ and checkpoints/base/> (the --out of the earlier phases' launch)",
    "sft": "--phase sft needs the tokenizer and the mid checkpoint: pass --upload <base dir with tokenizer/ and checkpoints/mid/> (the --out of the earlier phases' launch)",
    "rl": "--phase rl needs the tokenizer and the sft checkpoint: pass --upload <base dir with tokenizer/ and checkpoints/sft/> (the --out of the earlier phases' launch)",
    "eval": "--phase eval needs the earlier phases' report records: pass --upload <base dir with report/> (the --out of the earlier phases' launch)",
}


def assert_refused_before_renting(launch, server, proc, line):
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"error: {line}"], proc.stderr
    assert server.requests == [] and launch.tool_calls("ssh") == [] and launch.tool_calls("rsync") == []


@pytest.mark.parametrize("phase", sorted(PREFLIGHT))
def test_preflight_refuses_a_phase_without_its_inputs(launch, phase):
    with FakeShadeform(launch.remote) as server:
        proc = launch.run(server, phase=phase, upload=None)
        assert_refused_before_renting(launch, server, proc, PREFLIGHT[phase])


def test_preflight_names_what_the_upload_lacks(launch):
    """An --upload with some of the earlier phases: a phase whose inputs are there goes ahead, the next
    one is refused naming what is missing; a checkpoint cut short (step_N.tmp/) or left behind by
    --download report does not count."""
    partial = earlier_phases(launch.tmp / "partial", stages=("base",), report=False)
    (partial / "checkpoints" / "mid" / "d4" / "step_000005.tmp").mkdir(parents=True)
    (partial / "checkpoints" / "mid" / "d4" / "step_000005.tmp" / "model.pt").write_text("half")
    empty = launch.tmp / "empty"
    empty.mkdir()
    with FakeShadeform(launch.remote) as server:
        for phase in ("base", "mid"):  # their inputs are there: the dry run goes through to the end
            proc = launch.run(server, "--upload", partial, "--dry-run", phase=phase)
            assert proc.returncode == 0 and f"PHASE={phase} NPROC=8" in proc.stderr, proc.stderr
        proc = launch.run(server, "--upload", partial, phase="sft")
        assert_refused_before_renting(launch, server, proc, f"--phase sft needs the mid checkpoint: --upload {partial} has no checkpoints/mid/ (the --out of the earlier phases' launch, with --download all)")
        proc = launch.run(server, "--upload", partial, phase="eval")
        assert_refused_before_renting(launch, server, proc, f"--phase eval needs the earlier phases' report records: --upload {partial} has no report/ (the --out of the earlier phases' launch, with --download all)")
        proc = launch.run(server, "--upload", empty, phase="rl")
        assert_refused_before_renting(launch, server, proc, f"--phase rl needs the tokenizer and the sft checkpoint: --upload {empty} has no tokenizer/ and checkpoints/sft/ (the --out of the earlier phases' launch, with --download all)")
        # the refusal holds for a dry run too, and the first phases need nothing
        proc = launch.run(server, "--dry-run", phase="mid", upload=None)
        assert proc.returncode == 1 and PREFLIGHT["mid"] in proc.stderr
        for phase in ("all", "tok"):
            proc = launch.run(server, "--dry-run", phase=phase, upload=None)
            assert proc.returncode == 0, proc.stderr
        assert server.requests == []


def test_wheel_is_checked_before_renting(launch):
    with FakeShadeform(launch.remote) as server:
        proc = launch.run(server, "--wheel", launch.tmp / "nope.whl")
        assert_refused_before_renting(launch, server, proc, f"--wheel {launch.tmp / 'nope.whl'}: no such file")
        other = launch.tmp / "tokenizers-0.20.0-cp312-cp312-manylinux_2_17_x86_64.whl"
        other.write_bytes(b"")
        proc = launch.run(server, "--wheel", other)
        assert_refused_before_renting(launch, server, proc, f"--wheel {other}: not a nanochat wheel (nanochat-VERSION-cpXY-ABI-PLATFORM.whl, from maturin build --release)")
