"""
Run untrusted Python (HumanEval programs, the model's python tool calls) in a sandboxed subprocess.

A timeout, crash, memory blow-up or escape attempt is a failed ExecutionResult, never an exception
in the caller. execute_code() keeps no global state and uses no signals in the parent, so callers
may run many sandboxes at once from a thread pool.

The sandbox is layers; each narrows what the others let through. The kernel layers (Landlock,
seccomp, dropped capabilities) are what make it a boundary; sandbox_info() says which are active.

Parent side (any POSIX system):
  - a fresh temporary working directory, deleted afterwards; HOME and TMPDIR point into it;
  - a scrubbed environment (PATH, HOME, TMPDIR, LANG only): no tokens or keys reach the child;
  - `python -I -S -B`: PYTHON* variables, user and site packages ignored, no .pyc written;
  - its own session and process group, SIGKILLed as a group at a wall-clock deadline kept by the
    parent (subprocess timeout, not SIGALRM, so it works from any thread);
  - stdout + stderr read incrementally and capped; the group is killed when the cap is passed.
Child side, applied in this order before the untrusted code runs:
  - capabilities dropped (matters when the caller is root, e.g. in a container);
  - rlimits with hard = soft so they cannot be raised: RLIMIT_CPU (CPU seconds), RLIMIT_AS
    (address space), RLIMIT_FSIZE (largest file written), RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE;
  - Landlock (Linux >= 5.13, https://docs.kernel.org/userspace-api/landlock.html): files may be
    created, written or removed only inside the working directory; reads only there, in the
    Python installation and the system library directories (so not ~/.ssh, not /proc/<pid>/environ);
    TCP bind/connect denied (ABI >= 4); signals and abstract unix sockets scoped to the sandbox (ABI >= 6);
  - seccomp-bpf (Linux x86_64 / aarch64, https://docs.kernel.org/userspace-api/seccomp_filter.html):
    no new processes (threads are allowed), no exec, no sockets, no signals to other processes, no
    ptrace or pidfd tricks, no raising rlimits; denied calls fail with an errno, they do not kill;
  - a Python-level guard raising PermissionError for the same operations plus writes outside the
    working directory: readable errors everywhere, and the only layer on non-Linux systems, where
    the sandbox is therefore best effort and not a security boundary.

Why not namespaces (unshare): unprivileged user namespaces are disabled on many hosts (Ubuntu's
AppArmor policy, Docker's default seccomp profile), and seccomp + Landlock already cover what a
network and PID namespace would add here (sockets, signals to outside processes, fork bombs).
"""

import os
import sys
from collections import namedtuple
from functools import lru_cache

# This file is also the sandboxed child's entry point (run as a script), and every sandboxed run
# pays for its module-level imports: they are kept to what both sides need. The parent-side
# modules (subprocess, selectors, signal, tempfile, shutil) are imported in the functions using them.

DEFAULT_TIMEOUT = 5.0                     # seconds of wall-clock time
DEFAULT_MAX_MEMORY_BYTES = 1 << 30        # address space (RLIMIT_AS), not resident memory
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20        # stdout + stderr together
DEFAULT_MAX_FILE_BYTES = 16 << 20         # largest file the program may write
DEFAULT_MAX_PROCESSES = 16                # beyond the user's current count; fallback when seccomp is absent

PROGRAM_NAME = "main.py"                  # the program file inside the working directory
EXIT_EXCEPTION = 1                        # child exit status for an uncaught exception
EXIT_MEMORY = 3                           # child exit status for an uncaught MemoryError


ExecutionResult = namedtuple("ExecutionResult", "success stdout stderr error timed_out memory_exceeded")
ExecutionResult.__doc__ = """
Outcome of one sandboxed run (an immutable named tuple).

success: the program ran to the end (exit status 0) within every limit.
stdout, stderr: decoded as UTF-8 (invalid bytes replaced), together at most max_output_bytes.
error: None on success, else one line: the exception's last traceback line, "timed out ...",
    "memory limit exceeded", "output exceeded ...", "killed by signal ...".
timed_out: the wall-clock deadline or the CPU-time limit was hit.
memory_exceeded: the program died of a MemoryError under the address-space limit.
"""


def execute_code(code, timeout=DEFAULT_TIMEOUT, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES,
                 max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES, max_file_bytes=DEFAULT_MAX_FILE_BYTES,
                 max_processes=DEFAULT_MAX_PROCESSES):
    """
    Run `code` (a Python program, str) as __main__ in the sandbox described in the module docstring.

    timeout: wall-clock seconds (float > 0); the CPU-time limit is ceil(timeout) + 1 s as a backstop.
    max_memory_bytes: address-space limit (RLIMIT_AS) in bytes.
    max_output_bytes: cap on stdout + stderr bytes; the program is killed when it writes more.
    max_file_bytes: largest file the program may write (RLIMIT_FSIZE), in bytes.
    max_processes: RLIMIT_NPROC headroom above the user's current task count (only matters where
        seccomp is unavailable; with seccomp no process can be created at all).
    Returns an ExecutionResult; raises ValueError only for invalid arguments (never for the code).
    """
    return _run(code, "exec", timeout, max_memory_bytes, max_output_bytes, max_file_bytes, max_processes)


def run_tool_call(code, timeout=3.0, max_output_chars=512):
    """
    The engine's python tool: run `code` (an expression like "12*3" or a short program) in the
    sandbox and return what it printed plus the value of a final expression statement, stripped.

    Integral floats print as integers (48/2 -> "24") and other floats with 10 significant digits,
    matching the calculator outputs GSM8K annotations use. A failure returns "Error: <reason>" after
    any output; the result is cut to max_output_chars characters. Never raises for bad code.
    A single arithmetic expression is computed in this process instead (_arithmetic), with the
    output the sandbox would give.
    """
    text = _arithmetic(code)  # the calculator calls of GSM8K-style replies: no process needed
    if text is None:
        result = _run(code, "tool", timeout, DEFAULT_MAX_MEMORY_BYTES, 64 * 1024, DEFAULT_MAX_FILE_BYTES,
                      DEFAULT_MAX_PROCESSES)
        text = result.stdout.strip()
        if not result.success:
            text = (text + "\n" if text else "") + f"Error: {result.error}"
    if len(text) > max_output_chars:
        text = text[: max_output_chars - 3] + "..."
    return text


# Arithmetic of the python tool, evaluated in this process: one expression of number literals,
# parentheses, unary +/- and + - * / // % **. Anything else (names, calls, strings, statements), an
# error, or an integer of more than ARITHMETIC_MAX_BITS goes to the sandbox, which then gives the
# same text a sandboxed run always gives: the in-process result is Python's own arithmetic on the same
# values, formatted by the same _format_value (tests/test_execution.py compares the two on random
# expressions). It saves the sandbox's ~25-30 ms start-up per call, most of an RL rollout's tool time.
ARITHMETIC_MAX_BITS = 4096


def _arithmetic(code):
    """The python tool's output for code that is a single arithmetic expression, else None."""
    import ast
    import operator
    binary = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
    unary = {ast.UAdd: operator.pos, ast.USub: operator.neg}

    def bits(x):  # an integer's size (floats are bounded by their type)
        return abs(x).bit_length() if isinstance(x, int) else 0

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if bits(node.value) > ARITHMETIC_MAX_BITS:
                raise OverflowError
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in unary:
            return unary[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in binary:
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(b, int) and b > 0 and bits(a) * b > ARITHMETIC_MAX_BITS:
                raise OverflowError  # 9**9**9: bounded before it is computed
            if isinstance(node.op, ast.Mult) and bits(a) + bits(b) > ARITHMETIC_MAX_BITS:
                raise OverflowError
            result = binary[type(node.op)](a, b)
            if not isinstance(result, (int, float)) or bits(result) > ARITHMETIC_MAX_BITS:
                raise OverflowError  # (-8) ** 0.5 is complex: left to the sandbox
            return result
        raise ValueError("not arithmetic")

    if len(code) > 1000:
        return None
    try:
        tree = ast.parse(code, PROGRAM_NAME)  # as the sandbox parses it (exec mode)
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
            return None
        return _format_value(value(tree.body[0].value))
    except (SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None  # the sandbox runs it and reports the error its own way


@lru_cache(maxsize=1)
def sandbox_info():
    """
    Which layers a sandboxed child gets on this machine, probed once by starting one:
    {"capabilities_dropped": bool, "rlimits": bool, "landlock_abi": int (0 = none),
     "seccomp": bool, "python_guard": bool}.
    """
    result = _run("", "probe", 10.0, DEFAULT_MAX_MEMORY_BYTES, 1 << 16, DEFAULT_MAX_FILE_BYTES,
                  DEFAULT_MAX_PROCESSES)
    if not result.success:
        raise RuntimeError(f"the sandbox probe failed: {result.error}\n{result.stderr}")
    return {key: int(value) if value.isdigit() else value == "True"
            for key, value in (line.split("=") for line in result.stdout.split())}


# -----------------------------------------------------------------------------
# Parent side

def _run(code, mode, timeout, max_memory_bytes, max_output_bytes, max_file_bytes, max_processes):
    import math
    import signal
    import subprocess
    import tempfile
    import time
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    for name, value in [("max_memory_bytes", max_memory_bytes), ("max_output_bytes", max_output_bytes),
                        ("max_file_bytes", max_file_bytes), ("max_processes", max_processes)]:
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-exec-"))
    try:
        with open(os.path.join(workdir, PROGRAM_NAME), "w", encoding="utf-8") as f:
            f.write(code)
        limits = [math.ceil(timeout) + 1, max_memory_bytes, max_file_bytes, max_processes]  # CPU-time backstop in s
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        cmd = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), workdir, mode] + [str(x) for x in limits]
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        try:
            stdout, stderr, overflow, timed_out = _read_output(proc, deadline, max_output_bytes)
            if not (overflow or timed_out):
                try:  # the child may have closed its pipes and kept running
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            # Kill the whole group even after a clean exit: nothing the program started may outlive it.
            # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        _remove_tree(workdir)
    return _classify(proc.returncode, stdout, stderr, overflow, timed_out, timeout, max_output_bytes)


def _read_output(proc, deadline, max_output_bytes):
    """Read stdout/stderr until both close, the deadline passes or the byte cap is exceeded."""
    import selectors
    import time
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total, overflow, timed_out = 0, False, False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and not overflow:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                buffers[key.fd] += data[: max(0, max_output_bytes - total)]
                total += len(data)
                if total > max_output_bytes:
                    overflow = True
                    break
    stdout = buffers[proc.stdout.fileno()].decode("utf-8", errors="replace")
    stderr = buffers[proc.stderr.fileno()].decode("utf-8", errors="replace")
    return stdout, stderr, overflow, timed_out


def _classify(returncode, stdout, stderr, overflow, timed_out, timeout, max_output_bytes):
    import signal
    memory_exceeded = False
    if overflow:
        error = f"output exceeded {max_output_bytes} bytes"
    elif timed_out:
        error = f"timed out after {timeout:g} s"
    elif returncode == 0:
        error = None
    elif returncode == -signal.SIGXCPU:
        timed_out, error = True, "CPU time limit exceeded"
    elif returncode == EXIT_MEMORY:
        memory_exceeded, error = True, "memory limit exceeded"
    elif returncode < 0:
        error = f"killed by signal {signal.Signals(-returncode).name}"
    else:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else f"exited with status {returncode}"
    success = error is None
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded)


def _remove_tree(path):
    import shutil
    # The program may have left read-only files or directories behind; make them removable first.
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


# -----------------------------------------------------------------------------
# Child side: runs as `python -I -S -B execution.py WORKDIR MODE CPU_SECONDS MAX_MEMORY_BYTES
# MAX_FILE_BYTES MAX_PROCESSES` (MODE: exec | tool | probe); stdlib only.

def _child_main(workdir, mode, cpu_seconds, max_memory_bytes, max_file_bytes, max_processes):
    with open(os.path.join(workdir, PROGRAM_NAME), encoding="utf-8") as f:
        source = f.read()
    try:
        body, last_expr = _compile_program(source, mode)
    except (SyntaxError, ValueError) as e:
        sys.__excepthook__(type(e), e.with_traceback(None), None)
        sys.exit(EXIT_EXCEPTION)

    layers = {"capabilities_dropped": _drop_capabilities()}
    # RLIMIT_NPROC counts every task of the real uid (and is not enforced for root at all).
    nproc = max_processes + (_count_user_tasks(os.getuid()) if os.getuid() != 0 else 0)
    layers["rlimits"] = _set_rlimits(cpu_seconds, max_memory_bytes, max_file_bytes, nproc)
    layers["landlock_abi"] = _apply_landlock(workdir, _read_roots())
    layers["seccomp"] = _apply_seccomp()
    layers["python_guard"] = _apply_python_guard(workdir)
    if mode == "probe":
        print(" ".join(f"{key}={value}" for key, value in layers.items()))
        return

    sys.argv = [PROGRAM_NAME]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(body, namespace)
        if last_expr is not None:
            value = eval(last_expr, namespace)
            if value is not None:
                print(_format_value(value))
    except MemoryError:
        sys.stderr.write("MemoryError: memory limit exceeded\n")
        sys.exit(EXIT_MEMORY)
    except SystemExit:
        raise
    except BaseException as e:
        # The C excepthook needs no imports (traceback would); dropping this bootstrap frame starts
        # the traceback in the user's program.
        e = e.with_traceback(e.__traceback__.tb_next)
        sys.__excepthook__(type(e), e, e.__traceback__)
        sys.exit(EXIT_EXCEPTION)


def _compile_program(source, mode):
    """(body code, final-expression code or None). In tool mode a trailing expression is evaluated."""
    if mode != "tool":
        return compile(source, PROGRAM_NAME, "exec"), None
    import ast
    tree = ast.parse(source, PROGRAM_NAME)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
        return compile(tree, PROGRAM_NAME, "exec"), compile(last, PROGRAM_NAME, "eval")
    return compile(tree, PROGRAM_NAME, "exec"), None


def _format_value(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


@lru_cache(maxsize=1)
def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _drop_capabilities():
    """Clear the effective, permitted and inheritable capability sets (capset(2), version 3)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    return _libc().capset(ctypes.byref(header), data) == 0


def _count_user_tasks(uid):
    """Tasks (threads) owned by `uid`: RLIMIT_NPROC counts all of them, not just ours."""
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _set_rlimits(cpu_seconds, max_memory_bytes, max_file_bytes, max_processes):
    import resource
    limits = [
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_AS, max_memory_bytes, max_memory_bytes),
        (resource.RLIMIT_FSIZE, max_file_bytes, max_file_bytes),
        (resource.RLIMIT_NPROC, max_processes, max_processes),
        (resource.RLIMIT_NOFILE, 64, 64),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    for res, soft, hard in limits:
        _, current_hard = resource.getrlimit(res)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(res, (min(soft, hard), hard))
    return True


def _read_roots():
    """Directories the program may read from: the Python installation and system libraries."""
    roots = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    roots.update(["/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/local/lib", "/lib", "/lib64", "/lib32",
                  "/usr/share/zoneinfo", "/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/urandom"])
    return sorted(r for r in roots if r and os.path.exists(r))


# Landlock constants (include/uapi/linux/landlock.h).
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_FILE_ACCESS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | (1 << 14) | (1 << 15)  # + TRUNCATE, IOCTL_DEV


def _apply_landlock(workdir, read_roots):
    """Restrict file access to read_roots (read) and workdir (everything). Returns the ABI, 0 if none."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes
    libc = _libc()
    create_ruleset, add_rule, restrict_self = 444, 445, 446  # same numbers on every architecture
    abi = libc.syscall(create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # _VERSION flag
    if abi < 1:
        return 0
    handled_fs = (1 << 13) - 1                           # ABI 1: EXECUTE .. MAKE_SYM
    handled_fs |= (1 << 13) if abi >= 2 else 0           # REFER (rename/link across directories)
    handled_fs |= (1 << 14) if abi >= 3 else 0           # TRUNCATE
    handled_fs |= (1 << 15) if abi >= 5 else 0           # IOCTL_DEV
    handled_net = 0b11 if abi >= 4 else 0                # BIND_TCP | CONNECT_TCP
    scoped = 0b11 if abi >= 6 else 0                     # ABSTRACT_UNIX_SOCKET | SIGNAL

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                    ("scoped", ctypes.c_uint64)]

    class PathBeneathAttr(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # older kernels reject fields they do not know
    ruleset_fd = libc.syscall(create_ruleset, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset_fd < 0:
        return 0
    try:
        read_access = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
        rules = [(root, read_access) for root in read_roots] + [(workdir, handled_fs)]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(path):  # file rules may only carry file rights
                    access &= _LL_FILE_ACCESS
                if path == "/dev/null":
                    access |= _LL_WRITE_FILE
                rule = PathBeneathAttr(access & handled_fs, fd)
                if libc.syscall(add_rule, ctypes.c_int(ruleset_fd), ctypes.c_int(1), ctypes.byref(rule),
                                ctypes.c_uint32(0)) != 0:
                    return 0
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: required to self-restrict
            return 0
        if libc.syscall(restrict_self, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)) != 0:
            return 0
    finally:
        os.close(ruleset_fd)
    return abi


# Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h).
_SECCOMP_ARCH = {
    # machine: (AUDIT_ARCH_*, numbers)
    "x86_64": (0xC000003E, dict(fork=57, vfork=58, clone=56, clone3=435, execve=59, execveat=322, socket=41,
                                socketpair=53, kill=62, tkill=200, tgkill=234, ptrace=101, process_vm_readv=310,
                                process_vm_writev=311, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
                                setrlimit=160, prlimit64=302, unshare=272, setns=308)),
    "aarch64": (0xC00000B7, dict(clone=220, clone3=435, execve=221, execveat=281, socket=198, socketpair=199,
                                 kill=129, tkill=130, tgkill=131, ptrace=117, process_vm_readv=270,
                                 process_vm_writev=271, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
                                 setrlimit=164, prlimit64=261, unshare=97, setns=268)),
}


def _apply_seccomp():
    """Install the seccomp-bpf deny filter described in the module docstring. False if unsupported."""
    machine = os.uname().machine
    if not sys.platform.startswith("linux") or machine not in _SECCOMP_ARCH:
        return False
    import ctypes
    import errno
    audit_arch, nr = _SECCOMP_ARCH[machine]
    LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
    ALLOW, KILL = 0x7FFF0000, 0x80000000                          # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS

    def deny(e):
        return 0x00050000 | e                                     # SECCOMP_RET_ERRNO | errno

    NR, ARCH = 0, 4                                               # offsets in struct seccomp_data

    def arg_lo(i):
        return 16 + 8 * i                                         # low 32 bits of args[i] (little endian)

    me = os.getpid()
    prog = [(LD_ABS, 0, 0, ARCH), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL), (LD_ABS, 0, 0, NR)]
    if machine == "x86_64":  # x32 ABI numbers alias the 64-bit ones with bit 30 set
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, deny(errno.EPERM))]
    denied = {"fork": errno.EPERM, "vfork": errno.EPERM, "clone3": errno.ENOSYS,  # ENOSYS: glibc falls back to clone
              "execve": errno.EPERM, "execveat": errno.EPERM, "socket": errno.EACCES,
              "socketpair": errno.EACCES, "tkill": errno.EPERM, "ptrace": errno.EPERM,
              "process_vm_readv": errno.EPERM, "process_vm_writev": errno.EPERM, "pidfd_open": errno.EPERM,
              "pidfd_send_signal": errno.EPERM, "pidfd_getfd": errno.EPERM, "setrlimit": errno.EPERM,
              "unshare": errno.EPERM, "setns": errno.EPERM}
    for name, e in denied.items():
        if name in nr:
            prog += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, deny(e))]
    # clone: threads (CLONE_THREAD) only.
    prog += [(JEQ, 0, 4, nr["clone"]), (LD_ABS, 0, 0, arg_lo(0)), (JSET, 0, 1, 0x00010000),
             (RET, 0, 0, ALLOW), (RET, 0, 0, deny(errno.EPERM))]
    # kill / tgkill: only to this process.
    for name in ("kill", "tgkill"):
        prog += [(JEQ, 0, 4, nr[name]), (LD_ABS, 0, 0, arg_lo(0)), (JEQ, 0, 1, me),
                 (RET, 0, 0, ALLOW), (RET, 0, 0, deny(errno.EPERM))]
    # prlimit64: reading (new_limit == NULL) only.
    prog += [(JEQ, 0, 6, nr["prlimit64"]), (LD_ABS, 0, 0, arg_lo(2)), (JEQ, 0, 3, 0),
             (LD_ABS, 0, 0, arg_lo(2) + 4), (JEQ, 0, 1, 0), (RET, 0, 0, ALLOW), (RET, 0, 0, deny(errno.EPERM))]
    prog += [(RET, 0, 0, ALLOW)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    libc = _libc()
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    # PR_SET_SECCOMP (22), SECCOMP_MODE_FILTER (2); prctl's argtypes take the pointer as an integer.
    return libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) == 0


def _apply_python_guard(workdir):
    """Make the operations the kernel layers deny fail early with a readable PermissionError."""
    import builtins
    import io
    import socket
    import _posixsubprocess
    import _socket

    def deny(what):
        def denied(*args, **kwargs):
            raise PermissionError(f"{what} is not allowed in the nanochat sandbox")
        return denied

    for name in ["kill", "killpg", "fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "pidfd_open", "setsid", "setpgid"]:
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    _posixsubprocess.fork_exec = deny("subprocess")  # what subprocess and multiprocessing call to start a child
    for module in (socket, _socket):
        for name in ["socket", "socketpair", "fromfd", "create_connection", "create_server"]:
            if hasattr(module, name):
                setattr(module, name, deny(f"socket.{name}"))

    def inside(path):
        real = os.path.realpath(os.fsdecode(path))
        return real == workdir or real.startswith(workdir + os.sep)

    def check(path, what):
        if isinstance(path, int):  # an already-open file descriptor
            return
        if not inside(path):
            raise PermissionError(f"{what}({os.fsdecode(path)!r}): only the working directory is writable")

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, "open")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open
    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags:
            if kwargs.get("dir_fd") is not None:
                raise PermissionError("os.open with dir_fd is not allowed in the nanochat sandbox")
            check(path, "os.open")
        return real_os_open(path, flags, *args, **kwargs)

    os.open = guarded_os_open

    def path_guard(name, n_paths):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                raise PermissionError(f"os.{name} with dir_fd is not allowed in the nanochat sandbox")
            for path in args[:n_paths]:
                check(path, f"os.{name}")
            return real(*args, **kwargs)
        return guarded

    for name, n_paths in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("mkdir", 1),
                          ("rename", 2), ("replace", 2), ("renames", 2), ("link", 2), ("symlink", 2),
                          ("truncate", 1), ("chmod", 1), ("chown", 1), ("lchown", 1), ("utime", 1),
                          ("mkfifo", 1), ("mknod", 1)]:
        if hasattr(os, name):
            setattr(os, name, path_guard(name, n_paths))
    return True


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]))
