"""Run untrusted Python in a subprocess that cannot hang, flood, fork or reach the network.

Layers, outermost first:
- a fresh temporary working directory, deleted afterwards;
- a new session (process group) that is SIGKILLed as a whole when the run ends, whether by exit,
  wall-clock deadline or output cap, so background children die with it;
- `unshare -n` (an empty network namespace: even loopback is down) when it works here; it needs
  CAP_SYS_ADMIN, so it is probed once and skipped without it;
- when running as root: `setpriv` to the `nobody` uid, keeping only CAP_DAC_READ_SEARCH (the
  interpreter may live under /root; writes are still refused) and no_new_privs. This is what
  makes RLIMIT_NPROC bite: the kernel never applies it to root;
- `python -I` (isolated: no user site, no PYTHON* variables) running `_sandbox_runner.py`, which
  sets RLIMIT_CPU / AS / FSIZE / NPROC / CORE and installs an audit hook that exits with a distinct
  status on socket, process-creation and native-call events before running the program.
Output is read at most `max_output_bytes` per stream; more kills the run ("output_limit").
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
# Mirrors EXIT in _sandbox_runner.py.
_EXIT_REASONS = {241: "syntax_error", 242: "runtime_error", 243: "memory", 244: "network", 245: "process",
                 246: "forbidden", 247: "no_function", 248: "file_size"}
_NOBODY = 65534


@dataclass(kw_only=True)
class SandboxLimits:
    """Per-run limits. `nproc` counts every task of the sandbox uid, threads included: the default
    1 refuses all forks and threads. `use_netns` / `drop_root` turn those layers off (they are
    used only where they work)."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    fsize_mb: int = 16
    max_output_bytes: int = 1 << 20
    nproc: int = 1
    use_netns: bool = True
    drop_root: bool = True

    def __post_init__(self) -> None:
        if self.wall_s <= 0 or self.cpu_s < 1 or self.memory_mb < 64 or self.max_output_bytes < 1 or self.nproc < 1:
            raise ValueError(f"invalid sandbox limits: {self}")


@dataclass
class RunResult:
    """`reason` is None for a clean exit (status 0), else one of: timeout, output_limit, memory,
    syntax_error, runtime_error, network, process, forbidden, no_function, file_size, crash."""

    reason: str | None
    returncode: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float


_SETPRIV = [f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", "--no-new-privs"]
_CANDIDATES = {
    "netns": [("unshare", ["-n"])],
    # Keeping CAP_DAC_READ_SEARCH lets `nobody` read an interpreter under /root; containers that
    # do not grant it can still drop to `nobody` when the interpreter is world-readable.
    "drop_root": [("setpriv", [*_SETPRIV, "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search"]),
                  ("setpriv", [*_SETPRIV, "--inh-caps=-all"])],
}


@functools.lru_cache(maxsize=None)
def _layer(name: str) -> list[str] | None:
    """argv prefix for an isolation layer, or None where it does not work. Probed once per
    process by starting the real interpreter through it."""
    for tool, args in _CANDIDATES[name]:
        exe = shutil.which(tool)
        if exe is None:
            continue
        try:
            probe = subprocess.run([exe, *args, sys.executable, "-I", "-c", "import json, resource"],
                                   capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return [exe, *args]
    return None


def isolation_layers(limits: SandboxLimits) -> dict[str, bool]:
    """Which OS layers a run with `limits` gets on this machine."""
    return {
        "netns": limits.use_netns and _layer("netns") is not None,
        "drop_root": os.geteuid() == 0 and limits.drop_root and _layer("drop_root") is not None,
    }


def _command(limits: SandboxLimits, fn_name: str | None) -> tuple[list[str], bool]:
    layers = isolation_layers(limits)
    prefix = (_layer("netns") if layers["netns"] else []) + (_layer("drop_root") if layers["drop_root"] else [])
    config = {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb << 20, "fsize_bytes": limits.fsize_mb << 20,
              "nproc": limits.nproc, "fn_name": fn_name}
    return [*prefix, sys.executable, "-I", _RUNNER, json.dumps(config)], layers["drop_root"]


def _exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie, which keeps its pid (the process-group id) from being
    # reused before we killpg.
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc: subprocess.Popen, limits: SandboxLimits, deadline: float) -> tuple[bytes, bytes, str | None]:
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


def run_python(source: str, stdin: bytes = b"", limits: SandboxLimits | None = None, *,
               fn_name: str | None = None, calls: list | None = None) -> RunResult:
    """Run `source` with `stdin`; in call mode (`fn_name`), call `fn_name(*args)` for each args
    list in `calls` and print one JSON line per call (see _sandbox_runner._run_calls)."""
    limits = limits or SandboxLimits()
    argv, drop_root = _command(limits, fn_name)
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
        if drop_root:
            os.chown(workdir, _NOBODY, _NOBODY)
        return _run(argv, workdir, limits, start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(argv: list[str], workdir: str, limits: SandboxLimits, start: float) -> RunResult:
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": workdir,
           # BLAS libraries start a thread per core at import; RLIMIT_NPROC would refuse them.
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(os.path.join(workdir, "stdin.txt"), "rb") as stdin:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=env, start_new_session=True)
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
