"""The code sandbox against hostile programs, as the calling user and as an unprivileged one.

Every escape in ESCAPES runs through the `code` reward; each must score 0 with the named reason,
never print the planted secret, and leave no file outside the sandbox: not in the host's /tmp,
not in the run directory, not in the directory that carries the sandbox's inputs.

The unprivileged variant: as root, `as_user` starts a fresh interpreter as `nobody` in a private
mount namespace where the interpreter is reachable (CI's lives under /root, mode 0700; a tmpfs
over /root holding only the interpreter stands in for a home directory `nobody` can read). That
is how CI, which runs as root, exercises the user-namespace path. Limits are 1-2 s; the file is
meant to stay well under a minute of CPU.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from r1core import rewards
from r1core.rewards import code_reward, sandbox
from r1core.rewards import SandboxUnavailable  # exported: callers catch it without the private module
from r1core.rewards.sandbox import SandboxLimits, check_isolation, isolation_layers

FAST = SandboxLimits(wall_s=5, cpu_s=2, memory_mb=512)
HOSTILE = dict(
    wall_s=1.5, cpu_s=1, memory_mb=256, fsize_mb=1, write_mb=8, max_files=100, max_output_bytes=10_000
)
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}]
SECRET = "r1core-test-secret-0451"
NOBODY = 65534

# name: (program, reason, expected stdout or None, text the stderr must hold or None). The program
# is a template: {secret} is the path of a world-readable file in the caller's run directory,
# {marker} a file name in the host's /tmp, {pid} the caller's pid.
ESCAPES = {
    "read_etc_shadow": ("print(open('/etc/shadow').read())", "runtime_error", None, "FileNotFoundError"),
    "list_root": ("import os\nprint(os.listdir('/root'))", "runtime_error", None, "PermissionError"),
    "read_run_directory_file": ("print(open({secret!r}).read())", "runtime_error", None, "FileNotFoundError"),
    # /tmp is private and writable: the write succeeds there and nowhere else (checked afterwards).
    "write_tmp": (
        "open('/tmp/{marker}', 'w').write('x')\nprint(open('/tmp/{marker}').read())",
        "wrong",
        "x\n",
        None,
    ),
    "create_100k_files": (
        "for i in range(100_000):\n    open(f'f{{i}}', 'w').close()",
        "write_limit",
        None,
        "No space left",
    ),
    "fill_the_disk": (
        "for i in range(64):\n    open(f'b{{i}}', 'wb').write(bytes(1 << 19))",
        "write_limit",
        None,
        "No space left",
    ),
    "follow_planted_symlink": (
        "import os\nos.symlink({secret!r}, 'link')\nprint(open('link').read())",
        "runtime_error",
        None,
        "FileNotFoundError",
    ),
    "hard_link_host_file": (
        "import os\nos.link({secret!r}, 'hard')\nprint(open('hard').read())",
        "runtime_error",
        None,
        "FileNotFoundError",
    ),
    "plant_a_module": (
        "import os\nopen(os.path.dirname(os.__file__) + '/sitecustomize.py', 'w')",
        "runtime_error",
        None,
        "Read-only file system",
    ),
    # pidfd_send_signal raises no audit event: only the PID namespace keeps the caller out of reach.
    "signal_caller_below_the_hook": (
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), 0)",
        "runtime_error",
        None,
        "ProcessLookupError",
    ),
    "no_capabilities": (
        "print([l for l in open('/proc/self/status') if l.startswith('Cap')])",
        "wrong",
        repr([f"Cap{s}:\t{0:016x}\n" for s in ("Inh", "Prm", "Eff", "Bnd", "Amb")]) + "\n",
        None,
    ),
    "network_namespace_is_empty": (
        "print([l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]])",
        "wrong",
        "['lo']\n",
        None,
    ),
    # _posixsubprocess.fork_exec raises no audit event: only RLIMIT_NPROC (with a uid that is not
    # root) stops it. Python 3.11 signature.
    "fork_below_the_hook": (
        "import os, _posixsubprocess\nr, w = os.pipe()\n"
        "args = ([b'/bin/true'], [b'/bin/true'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w,"
        " True, False, -1, None, None, None, -1, None, False)\n"
        "try:\n    _posixsubprocess.fork_exec(*args)\n    print('forked')\n"
        "except BlockingIOError:\n    print('refused')\n",
        "wrong",
        "refused\n",
        None,
    ),
    "thread": (
        "import threading\nthreading.Thread(target=print).start()",
        "runtime_error",
        None,
        "new thread",
    ),
    # Today's cases (before the private filesystem): each stopped by the hook or a limit.
    "syntax_error": ("def f(:\n  pass", "syntax_error", None, None),
    "deep_nesting": ("x = " + "(" * 5000 + "1" + ")" * 5000, "syntax_error", None, None),
    "raise": ("raise ValueError('boom')", "runtime_error", None, "ValueError"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "process", None, None),
    "subprocess": ("import subprocess\nsubprocess.run(['true'])", "process", None, None),
    "network": (
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "network",
        None,
        None,
    ),
    "huge_allocation": ("x = bytearray(10**10)", "memory", None, None),
    "growing_memory": ("chunks = []\nwhile True:\n    chunks.append(' ' * 10**7)", "memory", None, None),
    "big_file": ("open('big.bin', 'wb').write(b'x' * (2 << 20))", "file_size", None, None),
    "cpu_loop": ("while True:\n    pass", "timeout", None, None),
    "output_flood": ("while True:\n    print('spam' * 100)", "output_limit", None, None),
    "non_utf8_output": ("import sys\nsys.stdout.buffer.write(b'3\\xff\\xfe\\n')", "non_utf8", None, None),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "forbidden", None, None),
    "native_call": ("import ctypes\nctypes.CDLL(None).getpid()", "forbidden", None, None),
    "null_pointer_read": ("import ctypes\nctypes.string_at(0)", "crash", None, None),
}

# Runs the ESCAPES through the code reward and prints {name: [score, reasons, stdout, stderr]}.
# The same function serves the in-process variant and, as a script, the unprivileged one.
RUN_ESCAPES = """
import json, os, sys
from r1core import rewards
from r1core.rewards import code_reward

def run_escapes(cases, limits, values):
    runs, results = [], {}
    real = code_reward.run_python
    code_reward.run_python = lambda *a, **k: runs.append(real(*a, **k)) or runs[-1]
    try:
        for name, body in cases.items():
            stats = rewards.RewardStats()
            program = "<think>plan</think>\\n```python\\n" + body.format(**values) + "\\n```\\n"
            score = rewards.get("code", stats)(
                program, [{"input": "1 2\\n", "output": "3\\n"}], limits=limits
            )
            run = runs[-1]
            results[name] = [score, stats.snapshot().get("code", {}), run.stdout.decode("utf-8", "replace"),
                             run.stderr.decode("utf-8", "replace")[-2000:]]
    finally:
        code_reward.run_python = real
    return results

if __name__ == "__main__":
    cases, limits, values = json.loads(sys.argv[1])
    values["pid"] = os.getpid()
    print(json.dumps({"uid": os.getuid(), "results": run_escapes(cases, limits, values)}))
"""
_namespace: dict = {}
exec(compile(RUN_ESCAPES, "RUN_ESCAPES", "exec"), _namespace)
run_escapes = _namespace["run_escapes"]


def _closed_ancestor(path: str) -> str | None:
    """The first directory on the way to `path` that other users cannot cross, if any."""
    current = "/"
    for part in path.strip("/").split("/"):
        if not os.stat(current).st_mode & 0o001:
            return current
        current = os.path.join(current, part)
    return None


def as_user(script: str, args: list[str], uid: int | None, cwd: str) -> dict:
    """Run `script` (printing one JSON line last) in a fresh interpreter in a private mount
    namespace where the interpreter is reachable by everyone, as `uid` (None: stay root). Its
    sandboxes put their input directories in a scratch TMPDIR, checked empty afterwards."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    if not all(shutil.which(t) for t in ("unshare", "setpriv", "mount")):
        pytest.skip("util-linux unshare/setpriv/mount are not installed")
    scratch = tempfile.mkdtemp()
    try:
        os.chmod(scratch, 0o755)
        tmp = os.path.join(scratch, "tmp")
        os.mkdir(tmp)
        os.chmod(tmp, 0o1777)
        steps = []
        closed = _closed_ancestor(sys.base_prefix)
        if closed is not None:
            stage = os.path.join(scratch, "stage")
            inner = os.path.join(stage, os.path.relpath(sys.base_prefix, closed))
            os.mkdir(stage)
            steps += [
                f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(stage)}",
                f"mkdir -p {shlex.quote(inner)}",
                f"mount --bind {shlex.quote(sys.base_prefix)} {shlex.quote(inner)}",
                f"mount --move {shlex.quote(stage)} {shlex.quote(closed)}",
            ]
        drop = (
            []
            if uid is None
            else [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ]
        )
        steps.append("exec " + shlex.join([*drop, sys.executable, "-c", script, *args]))
        package_root = os.path.dirname(os.path.dirname(rewards.__file__))
        env = {"PATH": os.defpath, "HOME": "/", "TMPDIR": tmp, "PYTHONPATH": package_root, "LANG": "C.UTF-8"}
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", " && ".join(steps)],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert os.listdir(tmp) == [], "sandbox input directories were left behind"
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def strong():
    """Skips (with the reason) only where the platform grants no private filesystem."""
    layers, errors = sandbox._plan(sandbox._wanted(SandboxLimits()))
    if not (layers or (False,))[0]:
        pytest.skip(f"no private filesystem on this platform: {'; '.join(errors)}")
    return layers


@pytest.fixture(scope="module")
def run_dir():
    """A run directory as a training job has one: beside the venv, world-readable, holding a secret
    that every host user could read, so only the sandbox can keep it from the program."""
    path = tempfile.mkdtemp(prefix=".r1core-test-run-", dir=os.path.dirname(sys.prefix))
    try:
        os.chmod(path, 0o755)
        secret = os.path.join(path, "secret.txt")
        with open(secret, "w") as f:
            f.write(SECRET)
        os.chmod(secret, 0o644)
        yield path
    finally:
        shutil.rmtree(path)


def _values(run_dir: str) -> dict:
    return {
        "secret": os.path.join(run_dir, "secret.txt"),
        "marker": f"r1core-escape-{os.getpid()}",
        "pid": os.getpid(),
    }


def _check_traces(run_dir: str, values: dict) -> None:
    assert not os.path.exists(os.path.join("/tmp", values["marker"]))
    assert os.listdir(run_dir) == ["secret.txt"]
    with open(values["secret"]) as f:
        assert f.read() == SECRET


@pytest.fixture(scope="module")
def caller_results(strong, run_dir):
    """The ESCAPES as the user running the tests, in this process."""
    values = _values(run_dir)
    base = tempfile.mkdtemp()
    saved_tempdir, cwd = tempfile.tempdir, os.getcwd()
    tempfile.tempdir = base
    os.chdir(run_dir)
    try:
        results = run_escapes({k: v[0] for k, v in ESCAPES.items()}, HOSTILE, values)
        assert os.listdir(base) == [], "sandbox input directories were left behind"
    finally:
        tempfile.tempdir = saved_tempdir
        os.chdir(cwd)
        os.rmdir(base)
    _check_traces(run_dir, values)
    return results


@pytest.fixture(scope="module")
def nobody_results(strong, run_dir):
    """The ESCAPES as `nobody` (the user-namespace path), all in one fresh interpreter."""
    values = _values(run_dir)
    cases = {k: v[0] for k, v in ESCAPES.items()}
    out = as_user(RUN_ESCAPES, [json.dumps([cases, HOSTILE, values])], NOBODY, run_dir)
    assert out["uid"] == NOBODY
    _check_traces(run_dir, values)
    return out["results"]


@pytest.mark.parametrize("name", list(ESCAPES))
@pytest.mark.parametrize("user", ["caller", "nobody"])
def test_escape_scores_zero_with_its_reason_and_leaves_no_trace(user, name, request):
    if sys.version_info[:2] != (3, 11) and name == "fork_below_the_hook":
        pytest.skip("fork_exec's argument list is version specific")
    score, reasons, stdout, stderr = request.getfixturevalue(f"{user}_results")[name]
    _, reason, want_stdout, want_stderr = ESCAPES[name]
    assert (score, reasons) == (0.0, {reason: 1}), stderr
    assert SECRET not in stdout and SECRET not in stderr
    if want_stdout is not None:
        assert stdout == want_stdout
    if want_stderr is not None:
        assert want_stderr in stderr


def test_all_layers_are_active_here_as_root_and_as_nobody(strong):
    expected = {"private_fs": True, "drop_root": os.geteuid() == 0, "netns": True}
    assert isolation_layers(SandboxLimits()) == check_isolation(SandboxLimits()) == expected
    script = (
        "import json; from r1core.rewards.sandbox import SandboxLimits, isolation_layers; "
        "print(json.dumps(isolation_layers(SandboxLimits())))"
    )
    assert as_user(script, [], NOBODY, "/") == {"private_fs": True, "drop_root": False, "netns": True}


def test_program_sees_a_read_only_root_with_its_own_work_dir_and_tmp(strong):
    src = (
        "import os, sys\nprint(os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'])\n"
        "print(sorted(os.listdir('/')))\nprint(os.path.exists('/etc/passwd'), os.path.exists('/home'))\n"
        "for path in ('/x', '/etc/x', sys.prefix + '/x'):\n"
        "    try:\n        open(path, 'w')\n    except OSError as e:\n        print(e.strerror)\n"
    )
    result = rewards.run_python(src, b"", FAST)
    lines = result.stdout.decode().splitlines()
    assert (result.reason, lines[0], lines[2]) == (None, "/sandbox /sandbox /tmp", "False False")
    top = {p.strip("/").split("/")[0] for p in (sys.base_prefix, sys.prefix)}
    assert (
        set(eval(lines[1])) <= {"dev", "etc", "lib", "lib32", "lib64", "proc", "sandbox", "tmp", "usr"} | top
    )
    # Read-only mounts; a folder that nobody may write anyway (a root-owned venv) can answer EACCES first.
    assert len(lines[3:]) == 3 and set(lines[3:]) <= {"Read-only file system", "Permission denied"}, lines[3:]


def test_write_caps_count_files_and_bytes_across_work_and_tmp(strong):
    limits = SandboxLimits(wall_s=5, cpu_s=2, write_mb=2, max_files=20, fsize_mb=16)
    files = (
        "n = 0\ntry:\n    while True:\n        open(('/tmp/' if n % 2 else '') + f'f{n}', 'w').close()\n"
        "        n += 1\nexcept OSError:\n    print(n)\n"
    )
    assert rewards.run_python(files, b"", limits).stdout == b"20\n"
    data = (
        "n = 0\ntry:\n    for i in range(64):\n        path = ('/tmp/' if i % 2 else '') + f'b{i}'\n"
        "        with open(path, 'wb', buffering=0) as f:\n            n += f.write(bytes(1 << 18))\n"
        "except OSError:\n    print(n)\n"
    )
    written = int(rewards.run_python(data, b"", limits).stdout)
    assert (2 << 20) - (1 << 18) <= written <= 2 << 20


def test_written_files_cannot_be_executed(strong):
    src = (
        "import os\nfor path in ('run.sh', '/tmp/run.sh'):\n    open(path, 'w').write('#!/bin/sh\\n')\n"
        "    os.chmod(path, 0o755)\n    print(os.access(path, os.X_OK))\n"
    )
    assert rewards.run_python(src, b"", FAST).stdout == b"False\nFalse\n"


@pytest.mark.parametrize("uid", [None, NOBODY], ids=["root", "nobody"])
def test_weak_isolation_never_runs_programs_as_root_or_with_capabilities(uid):
    # Weak mode as root needs an interpreter that nobody can read; as_user provides one.
    src = (
        "import os\nprint(os.getresuid(), [l for l in open('/proc/self/status') if l.startswith('CapEff')])\n"
        "open('/etc/shadow')\n"
    )
    script = (
        "import json, sys; from r1core.rewards import run_python, SandboxLimits; "
        "limits = SandboxLimits(wall_s=5, cpu_s=2, private_fs=False, allow_weak_isolation=True); "
        "r = run_python(sys.argv[1], b'', limits); "
        "print(json.dumps([r.reason, r.stdout.decode(), r.stderr.decode()]))"
    )
    reason, stdout, stderr = as_user(script, [src], uid, "/")
    assert (reason, stdout) == ("runtime_error", "(65534, 65534, 65534) ['CapEff:\\t0000000000000000\\n']\n")
    assert "PermissionError" in stderr


@pytest.fixture
def unavailable(monkeypatch):
    """fail(layer): from now on probes report `layer` (an index into sandbox._LAYERS) unavailable."""
    real = sandbox._probe

    def fail(layer):
        sandbox._plan.cache_clear()
        monkeypatch.setattr(sandbox, "_probe", lambda layers: "denied" if layers[layer] else real(layers))

    yield fail
    sandbox._plan.cache_clear()


def test_a_missing_layer_refuses_the_run_and_the_reward_unless_weak_isolation_is_allowed(strong, unavailable):
    unavailable(2)  # netns: the one layer every machine that passes `strong` can run without
    with pytest.raises(SandboxUnavailable, match="cannot set up netns.*allow_weak_isolation=True"):
        rewards.run_python("print(1)", b"", FAST)
    with pytest.raises(rewards.RewardConfigError, match="cannot set up netns"):
        rewards.get("code", rewards.RewardStats())("no program at all", SUM_TESTS)
    weak = {"allow_weak_isolation": True}
    assert isolation_layers(SandboxLimits(**weak)) == {
        "private_fs": True,
        "drop_root": os.geteuid() == 0,
        "netns": False,
    }
    program = "<think>x</think>\n```python\nprint(sum(map(int, input().split())))\n```"
    assert rewards.get("code", rewards.RewardStats())(program, SUM_TESTS, limits=weak) == 1.0


def test_without_private_fs_as_root_an_unreadable_interpreter_refuses_even_weak_isolation(unavailable):
    if os.geteuid() != 0 or _closed_ancestor(sys.base_prefix) is None:
        pytest.skip("only root with an interpreter that nobody cannot reach has nothing to fall back to")
    unavailable(0)
    with pytest.raises(SandboxUnavailable, match="cannot run here at all.*is not readable by uid 65534"):
        rewards.run_python("print(1)", b"", SandboxLimits(allow_weak_isolation=True))


def test_limits_reject_wrong_types_and_turning_layers_off_silently():
    with pytest.raises(ValueError, match="wall_s='5' is not float"):
        SandboxLimits(wall_s="5")
    with pytest.raises(ValueError, match="invalid sandbox limits"):
        SandboxLimits(wall_s=float("nan"))
    with pytest.raises(ValueError, match="cpu_s=1.5 is not int"):
        SandboxLimits(cpu_s=1.5)
    with pytest.raises(ValueError, match="use_netns=0 is not bool"):
        SandboxLimits(use_netns=0)
    with pytest.raises(ValueError, match=r"turning off \['private_fs'\] weakens isolation"):
        SandboxLimits(private_fs=False)
    with pytest.raises(rewards.RewardConfigError, match="allow_weak_isolation"):
        rewards.get("code")("x", SUM_TESTS, limits={"use_netns": False})
    with pytest.raises(TypeError, match="str source and bytes stdin"):
        rewards.run_python(b"print(1)")
    assert code_reward.parse_tests({"fn_name": "f", "tests": [{"args": [1], "output": 1}]}).fn_name == "f"
    with pytest.raises(code_reward.BadTests, match="not JSON"):
        code_reward.parse_tests({"fn_name": "f", "tests": [{"args": [{1, 2}], "output": 1}]})


def test_infinite_loop_is_killed_at_the_time_limit(strong):
    start = time.monotonic()
    result = rewards.run_python("while True:\n    pass", b"", SandboxLimits(**HOSTILE))
    # Killed at 1.5 s wall / 1 s CPU.
    assert result.reason == "timeout" and time.monotonic() - start < 4


def test_exposed_paths_skip_relative_sys_path_entries(monkeypatch, tmp_path):
    """An editable install of namespace packages puts a relative path-hook key on sys.path (as '' or '.'
    are); binding paths must skip them, not fail on mixing them with absolute ones (which left the
    sandbox unavailable)."""
    from r1core.rewards import _sandbox_runner as runner

    site = tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    hook = "__editable__.r1core-0.1.0.finder.__path_hook__"
    monkeypatch.setattr(sys, "path", ["", hook, ".", str(site)])
    kept = runner._exposed_paths()
    assert str(site) in kept
    assert all(os.path.isabs(p) for p in kept)


def test_sandbox_deletes_its_input_directory(monkeypatch):
    base = tempfile.mkdtemp()
    monkeypatch.setattr(tempfile, "tempdir", base)
    try:
        result = rewards.run_python(
            "open('scratch.txt', 'w').write('x')\nprint(open('scratch.txt').read())", b"", FAST
        )
        assert (result.reason, result.stdout, os.listdir(base)) == (None, b"x\n", [])
    finally:
        os.rmdir(base)
