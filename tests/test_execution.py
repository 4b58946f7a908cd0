"""
The sandbox (nanochat/execution.py): legitimate programs run; escape attempts are contained.

Each escape test tries the attack twice where it can: through the Python API (stopped by the
Python guard and the kernel layers) and through raw libc calls via ctypes (which bypass the Python
guard, so only Landlock / seccomp / dropped capabilities can stop them; those variants skip
themselves when sandbox_info() reports the layer missing). Timeouts are short to keep the file fast.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from nanochat import execution
from nanochat.execution import execute_code, run_tool_call, sandbox_info

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sandbox tests target Linux")

LIBC = "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"


def run(code, **kwargs):
    return execute_code(textwrap.dedent(code), **kwargs)


def needs(layer):
    info = sandbox_info()
    return pytest.mark.skipif(not info.get(layer), reason=f"kernel layer {layer!r} not available here")


@pytest.fixture
def workdir_parent(tmp_path, monkeypatch):
    """Make the sandbox's temporary working directories live in tmp_path, so '..' is ours to check."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture
def sigurg_log():
    """Record SIGURG deliveries to this process (SIGURG's default action is to ignore it, so a leak
    would not hurt the other processes in our group either)."""
    received = []
    previous = signal.signal(signal.SIGURG, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGURG, previous)


# -----------------------------------------------------------------------------
# Legitimate programs

def test_legitimate_program_runs():
    result = run("""
        import hashlib, json, math, tempfile, threading
        out = []
        t = threading.Thread(target=lambda: out.append(hashlib.md5(b"abc").hexdigest()))
        t.start(); t.join()
        with open("data.txt", "w") as f:
            f.write(json.dumps({"pi": round(math.pi, 3)}))
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("x")
        print(out[0], open("data.txt").read())
    """)
    assert result.success, result.stderr
    assert result.stdout == '900150983cd24fb0d6963f7d28e17f72 {"pi": 3.142}\n'
    assert result.error is None and not result.timed_out and not result.memory_exceeded


def test_exception_is_a_failed_result():
    result = run("def f():\n    raise ValueError('boom')\nf()\n")
    assert not result.success
    assert result.error == "ValueError: boom"
    assert 'File "main.py", line 2, in f' in result.stderr
    assert "execution.py" not in result.stderr  # the bootstrap frame is hidden


def test_exit_status_and_syntax_error():
    assert run("import sys; print('a'); sys.exit(0)").success
    failed = run("import sys; sys.exit(2)")
    assert not failed.success and failed.error == "exited with status 2"
    syntax = run("def f(:\n")
    assert not syntax.success and syntax.error.startswith("SyntaxError")


def test_each_run_gets_a_fresh_working_directory():
    first = run("import os; open('left.txt', 'w').write('x'); print(os.getcwd())")
    second = run("import os; print(os.path.exists('left.txt'), os.getcwd())")
    assert first.success and second.success
    assert second.stdout.split()[0] == "False"
    assert not os.path.exists(first.stdout.strip())  # removed afterwards


def test_run_tool_call():
    assert run_tool_call("48/2") == "24"
    assert run_tool_call("12/60") == "0.2"
    assert run_tool_call("0.1 + 0.2") == "0.3"
    assert run_tool_call("'strawberry'.count('r')") == "3"
    assert run_tool_call("x = 7\nprint('x is', x)\nx * 6") == "x is 7\n42"
    assert run_tool_call("y = 1") == ""
    assert run_tool_call("1/0") == "Error: ZeroDivisionError: division by zero"
    assert run_tool_call("print('a' * 1000)", max_output_chars=20) == "a" * 17 + "..."
    assert run_tool_call("while True: pass", timeout=0.5) == "Error: timed out after 0.5 s"


def sandboxed_tool_call(code):
    """run_tool_call's text from the sandbox alone (no in-process arithmetic)."""
    result = execution._run(code, "tool", 3.0, execution.DEFAULT_MAX_MEMORY_BYTES, 64 * 1024, execution.DEFAULT_MAX_FILE_BYTES, execution.DEFAULT_MAX_PROCESSES)
    text = result.stdout.strip()
    return text if result.success else (text + "\n" if text else "") + f"Error: {result.error}"


def random_expression(rng, depth=0):
    if depth >= 3 or rng.random() < 0.3:
        kind = rng.randrange(4)
        number = [str(rng.randrange(0, 1000)), f"{rng.uniform(0, 100):.{rng.randrange(1, 4)}f}", str(rng.randrange(0, 10)), f"{rng.randrange(1, 99)}e{rng.randrange(-5, 5)}"][kind]
        return ("-" if rng.random() < 0.15 else "") + number
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**", "*", "/"])
    right = random_expression(rng, depth + 1) if op != "**" else str(rng.choice([0, 1, 2, 3, 0.5, -1, -2]))
    return f"({random_expression(rng, depth + 1)} {op} {right})" if rng.random() < 0.5 else f"{random_expression(rng, depth + 1)}{op}{right}"


def test_arithmetic_in_process_equals_the_sandbox():
    """The tool's in-process arithmetic gives the sandbox's text on random expressions (ints, floats,
    negatives, every operator; divisions by zero and complex powers fall back to the sandbox), and
    leaves everything else to it."""
    import random

    rng = random.Random(0)
    exprs = [random_expression(rng) for _ in range(80)]
    exprs += ["48/2", "12/60", "0.1 + 0.2", "2**-2", "7 // -2", "-7 % 3", "1e308 * 10", "-0.0", "3.0 * 5", "(1 + 2) * (3 - 4) / 5", "10**15 / 1", "2 ** 100", "1/0", "5 % 0", "(-8) ** 0.5", "1.5 ** 10000", "9**9**9"]
    fast = 0
    for code in exprs:
        text = execution._arithmetic(code)
        if text is not None:
            fast += 1
            assert text == sandboxed_tool_call(code), code
    assert fast >= 70  # the random ones are mostly computable
    for code in ["1/0", "5 % 0", "(-8) ** 0.5", "1.5 ** 10000", "9**9**9", "10 ** 5000", "x", "x = 2", "2 + 2\n3", "'ab' * 3", "abs(-2)", "(1).real",
                 "[1, 2]", "True + 1", "1j * 2", "__import__('os').getpid()", "(lambda: 1)()", " 1 + 1", "1 +", "(" * 1000 + "1" + ")" * 1000]:
        assert execution._arithmetic(code) is None, code
    assert execution._arithmetic("-" * 999 + "1") in (None, "-1")  # deep nesting: computed or left to the sandbox, never an exception
    assert run_tool_call("9**9**9", timeout=0.5).startswith("Error: ")  # the sandbox's limits take it


def test_arithmetic_tool_calls_start_no_process(monkeypatch):
    def no_sandbox(*args):
        raise AssertionError("the sandbox was started")

    monkeypatch.setattr(execution, "_run", no_sandbox)
    assert run_tool_call("48/2") == "24" and run_tool_call("(3 + 4) * 2.5") == "17.5" and run_tool_call("2 ** 10 - 1") == "1023"
    with pytest.raises(AssertionError, match="sandbox was started"):
        run_tool_call("'strawberry'.count('r')")


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        execute_code("print(1)", timeout=0)
    with pytest.raises(ValueError):
        execute_code(b"print(1)")


# -----------------------------------------------------------------------------
# Escape attempts: resources

def test_infinite_loop_times_out():
    t0 = time.monotonic()
    result = run("while True:\n    pass\n", timeout=0.5)
    assert result.timed_out and not result.success
    assert time.monotonic() - t0 < 10  # generous: the machine may be loaded; a hang would be 60 s+


def test_sleep_hits_the_wall_clock_deadline():
    # Sleeping uses no CPU, so only the parent's wall-clock deadline can stop it.
    t0 = time.monotonic()
    result = run("import time\nprint('start', flush=True)\ntime.sleep(60)\n", timeout=0.5)
    assert result.timed_out and result.error == "timed out after 0.5 s"
    assert result.stdout == "start\n"  # output before the kill is kept
    assert time.monotonic() - t0 < 10


def test_closing_stdout_does_not_escape_the_deadline():
    t0 = time.monotonic()
    result = run("import os, time\nos.close(1); os.close(2)\ntime.sleep(60)\n", timeout=0.5)
    assert result.timed_out
    assert time.monotonic() - t0 < 10


def test_memory_bomb_is_contained():
    result = run("""
        hoard = []
        while True:
            hoard.append(bytearray(16 * 1024 * 1024))
    """, max_memory_bytes=256 * 1024 * 1024)
    assert not result.success and result.memory_exceeded
    assert result.error == "memory limit exceeded"


def test_huge_output_is_capped():
    t0 = time.monotonic()
    result = run("while True:\n    print('x' * 1000)\n", max_output_bytes=100_000, timeout=60)
    assert not result.success and result.error == "output exceeded 100000 bytes"
    assert len(result.stdout) + len(result.stderr) <= 100_000
    assert time.monotonic() - t0 < 20  # killed at the cap, not at the 60 s deadline


def test_huge_file_is_capped():
    result = run("open('big.bin', 'wb').write(b'x' * (8 * 1024 * 1024))\n", max_file_bytes=1024 * 1024)
    assert not result.success and "File too large" in result.error


def test_fork_bomb_is_contained():
    result = run("""
        import os
        for _ in range(1000):
            try:
                pid = os.fork()
            except OSError as e:
                print("fork failed:", type(e).__name__)
                break
            if pid == 0:
                print("CHILD RUNNING")
    """)
    assert result.success and "fork failed: PermissionError" in result.stdout
    assert "CHILD RUNNING" not in result.stdout


@needs("seccomp")
def test_raw_fork_and_exec_are_denied():
    result = run(LIBC + textwrap.dedent("""
        import os
        forks = [libc.fork() for _ in range(100)]
        if 0 in forks:
            print("CHILD RUNNING")
        print("forks", sorted(set(forks)))
        print("execv", libc.execv(b"/bin/sh", (ctypes.c_char_p * 2)(b"/bin/sh", None)))
    """))
    assert result.success, result.stderr
    assert "CHILD RUNNING" not in result.stdout
    assert "forks [-1]" in result.stdout and "execv -1" in result.stdout


def test_subprocesses_and_shell_are_denied(workdir_parent):
    marker = workdir_parent / "shell_was_here"
    result = run(f"""
        import os, subprocess
        for attempt in (lambda: os.system("touch {marker}"),
                        lambda: subprocess.run(["touch", "{marker}"]),
                        lambda: os.execv("/bin/sh", ["sh", "-c", "touch {marker}"])):
            try:
                attempt()
            except PermissionError:
                print("denied")
    """)
    assert result.stdout.count("denied") == 3
    assert not marker.exists()


def test_rlimits_cannot_be_raised():
    result = run("""
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            print("RAISED")
        except (ValueError, OSError) as e:
            print("denied", type(e).__name__)
        print(resource.getrlimit(resource.RLIMIT_AS)[1])
    """, max_memory_bytes=300 * 1024 * 1024)
    assert result.success, result.stderr
    assert "RAISED" not in result.stdout and "denied" in result.stdout
    assert result.stdout.split()[-1] == str(300 * 1024 * 1024)


# -----------------------------------------------------------------------------
# Escape attempts: the file system

def test_write_outside_the_working_directory_is_denied(workdir_parent):
    target = workdir_parent / "escaped.txt"
    result = run(f"""
        import os, pathlib
        for attempt in (lambda: open("{target}", "w").write("x"),
                        lambda: pathlib.Path("{target}").write_text("x"),
                        lambda: os.open("{target}", os.O_WRONLY | os.O_CREAT),
                        lambda: open("../escaped.txt", "a").write("x")):
            try:
                attempt()
                print("WROTE")
            except PermissionError:
                print("denied")
    """)
    assert result.stdout.split() == ["denied"] * 4
    assert not target.exists()


@needs("landlock_abi")
def test_raw_write_outside_is_denied(workdir_parent):
    target = workdir_parent / "escaped_raw.txt"
    result = run(LIBC + f"import os\nprint(libc.open(b'{target}', os.O_WRONLY | os.O_CREAT, 0o644))\n")
    assert result.stdout.strip() == "-1"
    assert not target.exists()


def test_files_in_the_parent_of_cwd_cannot_be_deleted(workdir_parent):
    sentinel = workdir_parent / "sentinel.txt"
    sentinel.write_text("keep me")
    result = run(LIBC + textwrap.dedent("""
        import os, shutil
        print(os.path.basename(os.path.dirname(os.getcwd())) != "", flush=True)
        for attempt in (lambda: os.remove("../sentinel.txt"),
                        lambda: os.rename("../sentinel.txt", "stolen.txt"),
                        lambda: shutil.rmtree("..")):
            try:
                attempt()
            except OSError:
                pass
        libc.unlink(b"../sentinel.txt")
        libc.rename(b"../sentinel.txt", b"stolen.txt")
    """))
    assert result.success, result.stderr
    assert sentinel.read_text() == "keep me"


@needs("landlock_abi")
def test_secret_files_outside_cannot_be_read(workdir_parent):
    secret = workdir_parent / "credentials"
    secret.write_text("TOKEN-d41d8cd98f00")
    secret.chmod(0o600)
    result = run(LIBC + textwrap.dedent(f"""
        import os
        for path in ("{secret}", "../credentials", os.path.expanduser("~/.ssh/id_rsa")):
            try:
                print(open(path).read())
            except OSError as e:
                print("denied", e.errno)
        buf = ctypes.create_string_buffer(100)
        fd = libc.open(b"{secret}", 0)
        print("raw", fd, libc.read(fd, buf, 100) if fd >= 0 else -1, buf.value)
    """))
    assert "TOKEN" not in result.stdout
    assert "raw -1" in result.stdout


# -----------------------------------------------------------------------------
# Escape attempts: environment, network, other processes

def test_secrets_in_the_environment_do_not_leak(monkeypatch):
    token = "sk-test-7f3a9c1e"
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", token)
    monkeypatch.setenv("PYTHONSTARTUP", "/nonexistent/evil.py")
    result = run(f"""
        import os
        print(sorted(os.environ))
        print(os.environ.get("NANOCHAT_TEST_SECRET"))
        for path in ("/proc/self/environ", "/proc/{os.getpid()}/environ", "/proc/%d/environ" % os.getppid()):
            try:
                print(open(path, "rb").read())
            except OSError as e:
                print("denied", e.errno)
    """)
    assert token not in result.stdout and token not in result.stderr
    assert result.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


def test_network_is_unreachable(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    unix_path = str(tmp_path / "server.sock")
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(unix_path)
    unix_server.listen()
    unix_server.settimeout(0.2)
    result = run(LIBC + textwrap.dedent(f"""
        import socket, _socket
        for attempt in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1),
                        lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM),
                        lambda: socket.socket(socket.AF_UNIX).connect("{unix_path}")):
            try:
                attempt()
                print("CONNECTED")
            except OSError as e:
                print("denied", type(e).__name__)
        print("raw", libc.socket(2, 1, 0), libc.socket(1, 1, 0))  # AF_INET, AF_UNIX; SOCK_STREAM
    """))
    try:
        for s in (server, unix_server):
            with pytest.raises(socket.timeout):
                s.accept()
    finally:
        server.close()
        unix_server.close()
    assert "CONNECTED" not in result.stdout and result.stdout.count("denied") == 3
    if sandbox_info()["seccomp"]:
        assert "raw -1 -1" in result.stdout


def test_signals_to_the_parent_and_its_group_are_contained(sigurg_log):
    # Positive control: the detector works.
    os.kill(os.getpid(), signal.SIGURG)
    time.sleep(0.05)
    assert sigurg_log == [signal.SIGURG]
    sigurg_log.clear()
    me, group = os.getpid(), os.getpgrp()
    result = run(f"""
        import os, signal
        for attempt in (lambda: os.kill(os.getppid(), signal.SIGURG),
                        lambda: os.kill({me}, signal.SIGURG),
                        lambda: os.killpg({group}, signal.SIGURG),
                        lambda: os.kill(-{group}, signal.SIGURG)):
            try:
                attempt()
            except OSError:
                print("denied")
    """)
    time.sleep(0.1)
    assert result.stdout.count("denied") == 4
    assert sigurg_log == []


@needs("seccomp")
def test_raw_signals_to_the_parent_and_its_group_are_contained(sigurg_log):
    me, group = os.getpid(), os.getpgrp()
    result = run(LIBC + f"print(libc.kill({me}, {int(signal.SIGURG)}), libc.kill(-{group}, {int(signal.SIGURG)}), "
                        f"libc.kill(-1, {int(signal.SIGURG)}))\n")
    time.sleep(0.1)
    assert result.stdout.strip() == "-1 -1 -1"
    assert sigurg_log == []


def test_other_processes_cannot_be_killed():
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        code = textwrap.dedent(f"""
            import os, signal
            try:
                os.kill({victim.pid}, signal.SIGKILL)
            except OSError:
                print("denied")
        """)
        if sandbox_info()["seccomp"]:
            code += f"import ctypes\nprint(ctypes.CDLL(None).kill({victim.pid}, 9))\n"
        result = run(code)
        time.sleep(0.05)
        assert victim.poll() is None, "the sandbox killed an outside process"
        assert result.stdout.startswith("denied")
    finally:
        victim.kill()
        victim.wait()


def test_privileges_are_dropped():
    # Giving a file away needs CAP_CHOWN: only a caller running as root has it to lose (containers).
    result = run(LIBC + textwrap.dedent("""
        import os
        open("mine.txt", "w").close()
        print(libc.chown(b"mine.txt", 12345, 12345), os.stat("mine.txt").st_uid != 12345)
    """))
    assert result.stdout.split() == ["-1", "True"]


@needs("seccomp")
def test_ptrace_and_pidfd_are_denied():
    result = run(LIBC + f"print(libc.ptrace(16, {os.getpid()}, 0, 0), libc.syscall(434, {os.getpid()}, 0))\n")
    assert result.stdout.strip() == "-1 -1"  # PTRACE_ATTACH, pidfd_open


def test_parallel_runs_are_independent():
    from concurrent.futures import ThreadPoolExecutor
    programs = [f"import os; open('id', 'w').write('{i}'); print(open('id').read())" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(execute_code, programs))
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(8)]
