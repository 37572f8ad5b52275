"""Runs one untrusted program. Started by `sandbox.py` as

    python -I _sandbox_runner.py CONFIG_JSON

in a fresh host directory holding `solution.py`, `stdin.txt` (already on fd 0) and, in call mode,
`calls.json`. Trusted code, standard library only: the isolated interpreter cannot and must not
import r1core.

Why the runner isolates itself rather than being wrapped by `unshare`/`setpriv`/`bwrap`: the
interpreter must be *started* by a process that can reach it (CI's lives under /root, mode 0700),
but the program must run with no privilege at all. Doing the work here, once Python is up and
before the first line of the program runs, needs no outside tool and keeps every step in one
place. The order is the point:

1. read the inputs from the host directory (it disappears from view in step 3);
2. private_fs: `unshare` the mount, PID, IPC and UTS namespaces (and a user namespace when not
   root, so an ordinary user gets the same isolation), plus the network namespace when asked, then
   fork: the child is PID 1 of the new PID namespace and runs the program; the parent only relays
   its exit status. A PID namespace matters most without root: the program keeps the caller's uid,
   and only a PID namespace hides the caller's processes from its kill() and ptrace();
3. build the new root on a tmpfs sized `write_bytes` with `max_files` spare inodes: the
   interpreter's prefix, the venv's sys.path directories and the system library directories bound
   read-only at their own paths, a few /dev nodes, a fresh /proc, and `/sandbox` and `/tmp` as
   the only writable (noexec) places, both on that tmpfs, so the caps on bytes and files cover them
   together. `pivot_root` then detaches the host tree: nothing else of the host is reachable;
4. drop privileges: to `nobody` when root; then empty the bounding, ambient, inheritable,
   permitted and effective capability sets, set no_new_privs and *verify* the sets are empty;
5. rlimits, then the audit hook, then the program.

Any failure in 2-4 exits with EXIT["sandbox_error"] and a one-line message: never a program run
with less isolation than requested. Without private_fs (weak mode, opted into by the caller) only
steps 1, 4 and 5 run, plus a bare network namespace when root.

The audit hook is a tripwire that turns forbidden operations into a distinct exit status (so
rewards can count *why* a program got 0); it is not the security boundary: a program can reach
interpreter internals, so the boundary is the OS (namespaces, no capabilities, a non-root uid
with RLIMIT_NPROC, rlimits, the parent's process-group kill). Exit statuses are listed in EXIT and
mirrored in sandbox.py.
"""

import ctypes
import errno
import json
import os
import resource
import signal
import sys
import traceback  # now: after the uid change the library may be out of reach

EXIT = {
    "syntax_error": 241,
    "runtime_error": 242,
    "memory": 243,
    "network": 244,
    "process": 245,
    "forbidden": 246,
    "no_function": 247,
    "file_size": 248,
    "sandbox_error": 249,
    "write_limit": 250,
}

_PROCESS_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.exec",
        "os.spawn",
        "os.system",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
    }
)
# ctypes may be imported (numpy does), but looking up or calling a C symbol is refused: with
# those a program could call fork() or socket() behind the hook's back.
_FORBIDDEN_EVENTS = frozenset(
    {
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "ctypes.dlsym",
        "ctypes.dlsym/handle",
        "ctypes.call_function",
        "ctypes.cdata",
        "ctypes.cdata/buffer",
        "sys.remote_exec",
    }
)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 16384, 1 << 18, 2
PR_SET_PDEATHSIG, PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 23, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, CAP_VERSION_3, CAP_SETPCAP = 47, 4, 0x20080522, 8
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_SYSTEM_LIBS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_SKELETON_INODES = 1  # tmpfs counts its own root directory against nr_inodes


class SetupError(Exception):
    """A step of the isolation failed: the program must not run."""


try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc: the interpreter's own symbols include its C library
    _libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _c(text):
    return None if text is None else os.fsencode(text)


def _mount(source, target, fstype, flags, data=None):
    _check(
        _libc.mount(_c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data)),
        f"mount {source or ''} on {target}",
    )


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------ namespaces and the new root


def _enter_namespaces(config):
    """unshare, then fork. Returns in the child (PID 1 of the new PID namespace); the parent never
    returns: it waits and exits the way the child did, so sandbox.py sees the program's status."""
    flags = (
        CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWNET if config["netns"] else 0)
    )
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(_libc.unshare(flags), "unshare")
    if uid != 0:
        # An unprivileged process may map only its own ids, and only after giving up setgroups().
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    pid = os.fork()
    if pid == 0:
        return
    _relay(pid)


def _relay(pid):
    """Exit the way process `pid` does: its exit status, or death by the same signal."""
    try:
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            os._exit(os.WEXITSTATUS(status))
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be given a handler
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    finally:
        os._exit(EXIT["sandbox_error"])  # never fall back into the program's path


def _exposed_paths():
    """Host paths bound read-only: the interpreter's installation, the venv's import directories
    (not the whole venv: it may sit in the run directory), and the system libraries its extension
    modules link against. A path under another is dropped: it is visible through the outer one. Relative
    sys.path entries are not host directories to bind: the working directory ('' or '.'), or the path-hook
    key an editable install of namespace packages puts there (setuptools' "__editable__.*.__path_hook__")."""
    prefixes = {sys.prefix, sys.exec_prefix} - {sys.base_prefix, sys.base_exec_prefix}
    venv = [
        p for p in sys.path if os.path.isabs(p) and any(os.path.commonpath([p, v]) == v for v in prefixes)
    ]
    candidates = [sys.base_prefix, sys.base_exec_prefix, *venv, *_SYSTEM_LIBS]
    paths = sorted({os.path.normpath(p) for p in candidates if os.path.exists(p)})
    if "/" in paths:
        raise SetupError("the interpreter's prefix is /: exposing it would expose the whole host")
    kept = []
    for p in paths:
        if not any(os.path.commonpath([p, k]) == k for k in kept):
            kept.append(p)
    return kept


def _work_dir(binds):
    """The program's cwd: /sandbox, unless an exposed path lies under it or above it (a venv in
    /sandbox/...); the two would hide each other."""
    for candidate in ("/sandbox", "/sandbox-work", "/work"):
        if not any(os.path.commonpath([candidate, b]) in (candidate, b) for b in binds):
            return candidate
    raise SetupError(f"no free path for the work directory among exposed paths {binds}")


def _skeleton(binds, writable):
    """Directories and files to create in the new root: mount points and their parents."""
    dirs, files = {*writable, "/proc", "/dev"}, set(_DEVICES)
    for path in binds:
        (dirs if os.path.isdir(path) else files).add(path)
    for path in list(dirs | files):
        parent = os.path.dirname(path)
        while parent != "/":
            dirs.add(parent)
            parent = os.path.dirname(parent)
    return sorted(dirs), sorted(files)


def _bind(source, target, flags):
    _mount(source, target, None, MS_BIND)
    # A bind mount ignores flags on creation; they take effect on a remount. In a user namespace
    # the source's noexec is locked and must be repeated, or the remount is refused.
    locked = os.statvfs(source).f_flag & MS_NOEXEC
    _mount(None, target, None, MS_REMOUNT | MS_BIND | flags | locked)


def _build_root(config):
    """Step 3 of the module doc, up to the pivot. Runs as root (real or of the new user namespace)
    in the host directory, where the tmpfs of the new root is mounted. Returns the work dir."""
    root, binds = os.getcwd(), _exposed_paths()
    if any(os.path.commonpath([b, "/tmp"]) == b for b in binds):
        raise SetupError(f"an exposed path contains /tmp: {binds}")
    work = _work_dir(binds)
    dirs, files = _skeleton(binds, (work, "/tmp"))
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    inodes = len(dirs) + len(files) + _SKELETON_INODES + config["max_files"]
    _mount(
        "tmpfs",
        root,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={config['write_bytes']},nr_inodes={inodes},mode=755",
    )
    for d in dirs:
        os.mkdir(root + d, 0o755)
    for f in files:
        open(root + f, "x").close()
    # Writable places first: a read-only path inside /tmp (a venv under /tmp) is then mounted on
    # top of the private /tmp instead of being hidden by it.
    for writable in (work, "/tmp"):
        _bind(root + writable, root + writable, MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in binds:
        _bind(path, root + path, MS_RDONLY | MS_NOSUID | MS_NODEV)
    for dev in _DEVICES:
        _bind(dev, root + dev, MS_NOSUID | MS_NOEXEC)
    try:  # without /proc the program still runs; some container runtimes refuse a fresh one
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        pass
    uid = config["uid"]
    os.chown(root + work, os.geteuid() if uid is None else uid, os.getegid() if uid is None else uid)
    os.chmod(root + work, 0o700)
    os.chmod(root + "/tmp", 0o1777)
    # Directories that only lead to a mount point can be crossed but not listed: /root shows
    # nothing of root's home. 0111 holds for the owner too, and the root becomes read-only.
    for d in dirs:
        if d not in (work, "/tmp", "/proc", "/dev") and d not in binds:
            os.chmod(root + d, 0o111)
    os.chdir(root)  # the cwd still is the host directory under the tmpfs; step onto the tmpfs
    return work


def _pivot(work):
    """Make the current directory the root and detach the host's tree (step 3, end)."""
    pivot = getattr(_libc, "pivot_root", None)
    if pivot is not None:
        _check(pivot(b".", b"."), "pivot_root")
    else:
        number = _PIVOT_ROOT.get(os.uname().machine)
        if number is None:
            raise SetupError(f"pivot_root: unknown syscall number on {os.uname().machine}")
        _check(_libc.syscall(number, b".", b"."), "pivot_root")
    # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only ours.
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(work)
    os.environ.update(HOME=work, TMPDIR="/tmp")


# ------------------------------------------------------------------ privileges and limits


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_privileges(uid):
    """To `uid` (when root) and no capability in any set. The bounding set goes first, while
    CAP_SETPCAP is still held; setresuid away from root empties permitted and effective. An
    ordinary user outside a user namespace may not shrink its bounding set, and need not: it holds
    no capability, and no_new_privs stops execve from granting any."""
    cap, can_drop = 0, _capable_of_setpcap()
    while (held := _libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0)) >= 0:  # EINVAL past the last one
        if held and can_drop:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
        cap += 1
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    header, data = _CapHeader(CAP_VERSION_3, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    left = [getattr(d, s) for d in data for s in ("effective", "permitted", "inheritable")]
    if any(left) or can_drop and any(_libc.prctl(PR_CAPBSET_READ, c, 0, 0, 0) for c in range(cap)):
        raise SetupError(f"capabilities remain after dropping them: {left}")
    if uid is not None and 0 in os.getresuid():
        raise SetupError("still root after setresuid")


def _capable_of_setpcap():
    header, data = _CapHeader(CAP_VERSION_3, 0), (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    return bool(data[0].effective & (1 << CAP_SETPCAP))


def _set_limits(limits, pid_one):
    def cap(which, soft, hard=None):
        resource.setrlimit(which, (soft, soft if hard is None else hard))

    # CPU: SIGXCPU at the soft limit, SIGKILL one second later if it is caught. PID 1 of a PID
    # namespace never receives SIGXCPU (the kernel drops default-action signals to it), so there
    # the hard limit is the limit.
    cap(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + (0 if pid_one else 1))
    cap(resource.RLIMIT_AS, limits["memory_bytes"])
    cap(resource.RLIMIT_FSIZE, limits["fsize_bytes"])
    cap(resource.RLIMIT_CORE, 0)
    # Counts every task (threads too) of this uid: with the default of 1 and a uid of its own (or
    # any uid already running a process) no fork and no thread can start. In a user namespace the
    # count is per namespace and includes the relaying parent, hence the extra one.
    in_userns = pid_one and limits["uid"] is None and os.geteuid() != 0
    cap(resource.RLIMIT_NPROC, limits["nproc"] + (1 if in_userns else 0))


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


def _isolate(config):
    """Steps 2-4 of the module doc; returns whether this process is PID 1 of a new namespace."""
    if config["private_fs"]:
        _enter_namespaces(config)
        _pivot(_build_root(config))
    elif config["netns"]:
        _check(_libc.unshare(CLONE_NEWNET), "unshare network namespace")
    _drop_privileges(config["uid"])
    if config["private_fs"]:
        # After the uid change, which clears it: if the relaying parent dies, so does the program.
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set parent-death signal")
    return config["private_fs"]


# ------------------------------------------------------------------ the program


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"return value of type {type(value).__name__} is not JSON")


def _run_calls(namespace, fn_name, calls):
    """Call mode: results go to the real stdout, one JSON line per call; the program's own
    prints are sent to stderr so they cannot garble them."""
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


def _failure_status(e):
    # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as EFBIG from write(); a full tmpfs (bytes
    # or inodes) as ENOSPC.
    code = getattr(e, "errno", None)
    if code == errno.EFBIG:
        return EXIT["file_size"]
    if code in (errno.ENOSPC, errno.EDQUOT):
        return EXIT["write_limit"]
    return EXIT["runtime_error"]


def main():
    config = json.loads(sys.argv[1])
    with open("solution.py", encoding="utf-8", errors="replace") as f:
        source = f.read()
    calls = None
    if config["fn_name"] is not None:
        with open("calls.json") as f:
            calls = json.load(f)
    try:
        pid_one = _isolate(config)
        _set_limits(config, pid_one)
    except (SetupError, OSError) as e:
        sys.stderr.write(f"sandbox setup failed: {e}\n")
        sys.stderr.flush()
        os._exit(EXIT["sandbox_error"])
    _install_hook()
    try:
        code = compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        os._exit(EXIT["syntax_error"])
    namespace = {"__name__": "__main__" if config["fn_name"] is None else "solution"}
    try:
        exec(code, namespace)
        if config["fn_name"] is not None:
            _run_calls(namespace, config["fn_name"], calls)
    except SystemExit:
        raise
    except MemoryError:
        os._exit(EXIT["memory"])
    except BaseException as e:  # noqa: BLE001 - report, then a distinct status
        traceback.print_exc()
        for stream in (sys.stdout, sys.stderr):
            try:  # what the program printed before failing helps whoever reads the run
                stream.flush()
            except Exception:  # noqa: BLE001 - a full pipe or closed stream must not hide the status
                pass
        os._exit(_failure_status(e))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
