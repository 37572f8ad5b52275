"""Run untrusted Python in a subprocess that cannot read the host, hang, flood, fork or reach the
network.

Layers (the runner, `_sandbox_runner.py`, sets up all but the first two itself; its docstring
says how and in which order):
- a fresh host directory that carries the inputs, deleted afterwards;
- a new session (process group) that is SIGKILLed as a whole when the run ends, whether by exit,
  wall-clock deadline or output cap, so background children die with it;
- `private_fs`: new mount, PID, IPC and UTS namespaces (inside a user namespace when not root).
  The program sees the interpreter, the venv's import directories and the system libraries
  read-only, a few /dev nodes, its own /proc, and a private tmpfs as `/sandbox` (its cwd and
  HOME) and `/tmp`, the only writable places, capped together at `write_mb` and `max_files`;
- `netns`: an empty network namespace (even loopback is down);
- `drop_root`: when running as root, the uid `nobody`, which is what makes RLIMIT_NPROC bite: the
  kernel never applies it to root;
- always: no capability in any set and no_new_privs, checked before the program runs; rlimits
  (CPU, address space, file size, processes, core); an audit hook that exits with a distinct
  status on socket, process-creation and native-call events.
Output is read at most `max_output_bytes` per stream; more kills the run ("output_limit").

A layer the machine does not grant is never skipped silently: `run_python` raises
`SandboxUnavailable` naming it, unless the limits say `allow_weak_isolation=True`; then the run
uses the strongest combination that works here (`isolation_layers` reports it). Which layers
work is probed once per process by running the runner itself.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields

from r1core.rewards.registry import RewardConfigError

log = logging.getLogger(__name__)

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
# Mirrors EXIT in _sandbox_runner.py.
_EXIT_REASONS = {
    241: "syntax_error",
    242: "runtime_error",
    243: "memory",
    244: "network",
    245: "process",
    246: "forbidden",
    247: "no_function",
    248: "file_size",
    249: "sandbox_error",
    250: "write_limit",
}
_NOBODY = 65534
_LAYERS = ("private_fs", "drop_root", "netns")  # weak mode gives up netns first, then private_fs


class SandboxUnavailable(RewardConfigError):
    """A requested isolation layer does not work on this machine and weak isolation was not
    allowed. Raised by `run_python` (so also by the `code` reward) before anything runs."""


@dataclass(kw_only=True)
class SandboxLimits:
    """Per-run limits. `nproc` counts every task of the sandbox uid, threads included: the default
    1 refuses all forks and threads. `write_mb` and `max_files` cap what the program may write
    (bytes, and files + directories + links) in /sandbox and /tmp together; `fsize_mb` caps each
    file.
    `private_fs`, `use_netns` and `drop_root` are the isolation layers (module doc); turning one
    off, or running where one is unavailable, needs `allow_weak_isolation=True`."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    fsize_mb: int = 16
    write_mb: int = 64
    max_files: int = 1000
    max_output_bytes: int = 1 << 20
    nproc: int = 1
    private_fs: bool = True
    use_netns: bool = True
    drop_root: bool = True
    allow_weak_isolation: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = (int, float) if f.type == "float" else int
            is_bool = isinstance(value, bool)
            if (f.type == "bool") != is_bool or not isinstance(value, bool if is_bool else number):
                raise ValueError(f"invalid sandbox limits: {f.name}={value!r} is not {f.type}")
        if (
            not 0 < self.wall_s < math.inf
            or self.cpu_s < 1
            or self.memory_mb < 64
            or self.fsize_mb < 1
            or self.write_mb < 1
            or self.max_files < 0
            or self.max_output_bytes < 1
            or self.nproc < 1
        ):
            raise ValueError(f"invalid sandbox limits: {self}")
        off = [name for name in ("private_fs", "use_netns", "drop_root") if not getattr(self, name)]
        if off and not self.allow_weak_isolation:
            raise ValueError(
                f"invalid sandbox limits: turning off {off} weakens isolation; "
                "set allow_weak_isolation=True to accept that"
            )


@dataclass
class RunResult:
    """`reason` is None for a clean exit (status 0), else one of: timeout, output_limit, memory,
    syntax_error, runtime_error, network, process, forbidden, no_function, file_size, write_limit,
    crash, sandbox_error (the isolation could not be set up: the program did not run)."""

    reason: str | None
    returncode: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float


def _wanted(limits: SandboxLimits) -> tuple[bool, bool, bool]:
    return limits.private_fs, limits.drop_root and os.geteuid() == 0, limits.use_netns


def _config(layers: tuple[bool, bool, bool], limits: SandboxLimits, fn_name: str | None) -> dict:
    private_fs, drop_root, netns = layers
    return {
        "cpu_s": limits.cpu_s,
        "memory_bytes": limits.memory_mb << 20,
        "fsize_bytes": limits.fsize_mb << 20,
        "nproc": limits.nproc,
        "fn_name": fn_name,
        "private_fs": private_fs,
        "netns": netns,
        "uid": _NOBODY if drop_root else None,
        "write_bytes": limits.write_mb << 20,
        "max_files": limits.max_files,
    }


# The probe imports a C extension not loaded at startup: it proves the library directories and
# the interpreter's prefix are visible (and executable) to the program. A standard library that
# only root can read (an interpreter under /root, without private_fs) is named in its message.
_PROBE = """import os
stdlib = os.path.dirname(os.__file__)
if not os.access(stdlib, os.R_OK | os.X_OK):
    raise SystemExit(f"the standard library {stdlib} is not readable by uid {os.getuid()}")
import decimal, heapq
print(decimal.Decimal(1) / 8)
"""


@functools.lru_cache(maxsize=None)
def _probe(layers: tuple[bool, bool, bool]) -> str | None:
    """None if a run with these layers works here, else why not (the runner's message)."""
    limits = SandboxLimits(wall_s=60, cpu_s=30, allow_weak_isolation=True)
    try:
        result = _execute(_PROBE, b"", limits, layers, None, None)
    except OSError as e:
        return str(e)
    if result.reason is None and result.stdout == b"0.125\n":
        return None
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


@functools.lru_cache(maxsize=None)
def _plan(wanted: tuple[bool, bool, bool]) -> tuple[tuple[bool, bool, bool] | None, tuple[str, ...]]:
    """The strongest working subset of the wanted layers (None if none works), and why the
    stronger ones failed. `drop_root` is never given up: code running as root, even with no
    capability, still owns every file root owns (/etc/shadow, /root)."""
    errors = []
    private_fs, drop_root, netns = wanted
    for layers in itertools.product(
        (True, False) if private_fs else (False,), (drop_root,), (True, False) if netns else (False,)
    ):
        error = _probe(layers)
        if error is None:
            if errors:
                log.warning("code sandbox: weak isolation available only (%s)", "; ".join(errors))
            return layers, tuple(errors)
        errors.append(f"{'+'.join(n for n, on in zip(_LAYERS, layers) if on) or 'no layer'}: {error}")
    return None, tuple(errors)


def isolation_layers(limits: SandboxLimits) -> dict[str, bool]:
    """Which OS layers a run with `limits` gets on this machine (probed once per process)."""
    layers, _ = _plan(_wanted(limits))
    return dict(zip(_LAYERS, layers or (False, False, False)))


def check_isolation(limits: SandboxLimits) -> dict[str, bool]:
    """The layers a run with `limits` gets; raises SandboxUnavailable where `run_python` would."""
    return dict(zip(_LAYERS, _layers_for(limits)))


def _layers_for(limits: SandboxLimits) -> tuple[bool, bool, bool]:
    wanted = _wanted(limits)
    layers, errors = _plan(wanted)
    if layers is None:
        raise SandboxUnavailable(
            f"the code sandbox cannot run here at all ({'; '.join(errors)}). Allow mount namespaces "
            "(CAP_SYS_ADMIN, or unprivileged user namespaces for a non-root user) or, as root without "
            "them, use an interpreter that the user nobody can read."
        )
    missing = [n for n, w, got in zip(_LAYERS, wanted, layers) if w and not got]
    if missing and not limits.allow_weak_isolation:
        raise SandboxUnavailable(
            f"the code sandbox cannot set up {', '.join(missing)} on this machine ({'; '.join(errors)}). "
            "Untrusted code would be less isolated than requested; pass allow_weak_isolation=True in the "
            "sandbox limits to accept that (see r1core/rewards/README.md)."
        )
    return layers


def _exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie, which keeps its pid (the process-group id) from being
    # reused before we killpg.
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(
    proc: subprocess.Popen, limits: SandboxLimits, deadline: float
) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr until both close and the process exits, the deadline passes or a stream
    exceeds the cap. Returns (stdout, stderr, None | "timeout" | "output_limit")."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    cut = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while cut is None:
            if not sel.get_map() and _exited(proc.pid):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cut = "timeout"
            elif not sel.get_map():
                time.sleep(min(remaining, 0.01))  # pipes closed: only the exit is awaited
            else:
                for key, _ in sel.select(remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                    bufs[key.fd] += chunk
                    if len(bufs[key.fd]) > limits.max_output_bytes:
                        cut = "output_limit"
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), cut


def _classify(returncode: int) -> str | None:
    if returncode == 0:
        return None
    if returncode in _EXIT_REASONS:
        return _EXIT_REASONS[returncode]
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
    return "crash" if returncode < 0 else "runtime_error"


def run_python(
    source: str,
    stdin: bytes = b"",
    limits: SandboxLimits | None = None,
    *,
    fn_name: str | None = None,
    calls: list | None = None,
) -> RunResult:
    """Run `source` with `stdin`; in call mode (`fn_name`), call `fn_name(*args)` for each args
    list in `calls` and print one JSON line per call (see _sandbox_runner._run_calls). Raises
    SandboxUnavailable (module doc) and TypeError for arguments of the wrong type."""
    if not isinstance(source, str) or not isinstance(stdin, (bytes, bytearray)):
        raise TypeError(
            f"run_python needs str source and bytes stdin, got {type(source).__name__}, "
            f"{type(stdin).__name__}"
        )
    limits = limits or SandboxLimits()
    return _execute(source, bytes(stdin), limits, _layers_for(limits), fn_name, calls)


def _execute(
    source: str,
    stdin: bytes,
    limits: SandboxLimits,
    layers: tuple[bool, bool, bool],
    fn_name: str | None,
    calls: list | None,
) -> RunResult:
    config = _config(layers, limits, fn_name)
    workdir = tempfile.mkdtemp(prefix="r1core-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(source)
        if fn_name is not None:
            with open(os.path.join(workdir, "calls.json"), "w") as f:
                json.dump(calls or [], f)
        with open(os.path.join(workdir, "stdin.txt"), "wb") as f:
            f.write(stdin)
        if config["uid"] is not None and not config["private_fs"]:
            os.chown(workdir, _NOBODY, _NOBODY)  # weak mode: the host directory is the program's cwd
        return _run([sys.executable, "-I", _RUNNER, json.dumps(config)], workdir, limits, start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(argv: list[str], workdir: str, limits: SandboxLimits, start: float) -> RunResult:
    env = {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "HOME": workdir,
        # BLAS libraries start a thread per core at import; RLIMIT_NPROC would refuse them.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    with open(os.path.join(workdir, "stdin.txt"), "rb") as stdin:
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    out, err, cut = b"", b"", "timeout"
    try:
        out, err, cut = _collect(proc, limits, start + limits.wall_s)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    reason = cut if cut is not None else _classify(proc.returncode)
    cap = limits.max_output_bytes
    return RunResult(reason, proc.returncode, out[:cap], err[:cap], time.monotonic() - start)
