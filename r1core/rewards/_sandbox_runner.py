"""Runs one untrusted program. Started by `sandbox.py` as

    [unshare -n] [setpriv ...] python -I _sandbox_runner.py LIMITS_JSON

in a fresh temporary directory holding `solution.py` (and `calls.json` in call mode). Trusted
code, standard library only: the isolated interpreter cannot and must not import r1core.

Order matters: limits first, then the audit hook, then the program. The hook is a tripwire that
turns forbidden operations into a distinct exit status (so rewards can count *why* a program got
0); it is not the security boundary: a program can reach interpreter internals, so the boundary
is the OS (rlimits, a separate uid with RLIMIT_NPROC, the network namespace, the parent's
process-group kill). Exit statuses are listed in EXIT and mirrored in sandbox.py.
"""

import errno
import json
import os
import resource
import sys

EXIT = {"syntax_error": 241, "runtime_error": 242, "memory": 243, "network": 244, "process": 245,
        "forbidden": 246, "no_function": 247, "file_size": 248}

_PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn",
})
# ctypes may be imported (numpy does), but looking up or calling a C symbol is refused: with
# those a program could call fork() or socket() behind the hook's back.
_FORBIDDEN_EVENTS = frozenset({
    "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlsym", "ctypes.dlsym/handle",
    "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer", "sys.remote_exec",
})


def _set_limits(limits):
    def cap(which, soft, hard=None):
        resource.setrlimit(which, (soft, soft if hard is None else hard))

    # CPU: SIGXCPU at the soft limit, SIGKILL one second later if it is caught.
    cap(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1)
    cap(resource.RLIMIT_AS, limits["memory_bytes"])
    cap(resource.RLIMIT_FSIZE, limits["fsize_bytes"])
    cap(resource.RLIMIT_CORE, 0)
    # Counts every task (threads too) of this uid: with the default of 1 and a uid of its own (or
    # any uid already running a process) no fork and no thread can start.
    cap(resource.RLIMIT_NPROC, limits["nproc"])


def _install_hook():
    exit_now = os._exit  # bound now: the program may replace os._exit
    process, forbidden = _PROCESS_EVENTS, _FORBIDDEN_EVENTS
    network, proc_code, forbidden_code = EXIT["network"], EXIT["process"], EXIT["forbidden"]

    def hook(event, args):
        if event.startswith("socket."):
            exit_now(network)
        if event in process:
            exit_now(proc_code)
        if event in forbidden:
            exit_now(forbidden_code)

    sys.addaudithook(hook)


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"return value of type {type(value).__name__} is not JSON")


def _run_calls(namespace, fn_name):
    """Call mode: results go to the real stdout, one JSON line per call; the program's own
    prints are sent to stderr so they cannot garble them."""
    with open("calls.json") as f:
        calls = json.load(f)
    fn = namespace.get(fn_name)
    if fn is None and "Solution" in namespace:  # LeetCode style: a method of class Solution
        fn = getattr(namespace["Solution"](), fn_name, None)
    if not callable(fn):
        os._exit(EXIT["no_function"])
    results = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr
    for i, args in enumerate(calls):
        try:
            line = json.dumps({"i": i, "r": fn(*args)}, default=_jsonable)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - one failing call fails that test only
            line = json.dumps({"i": i, "error": type(e).__name__})
        results.write(line + "\n")
        results.flush()


def main():
    limits = json.loads(sys.argv[1])
    _set_limits(limits)
    _install_hook()
    with open("solution.py", encoding="utf-8", errors="replace") as f:
        source = f.read()
    try:
        code = compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        os._exit(EXIT["syntax_error"])
    namespace = {"__name__": "__main__" if limits["fn_name"] is None else "solution"}
    try:
        exec(code, namespace)
        if limits["fn_name"] is not None:
            _run_calls(namespace, limits["fn_name"])
    except SystemExit:
        raise
    except MemoryError:
        os._exit(EXIT["memory"])
    except BaseException as e:  # noqa: BLE001 - report, then a distinct status
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as EFBIG from write().
        os._exit(EXIT["file_size"] if getattr(e, "errno", None) == errno.EFBIG else EXIT["runtime_error"])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
