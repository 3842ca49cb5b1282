"""Running untrusted programs (model-written code) in isolation, never in the evaluating process.

    box = Sandbox(Limits(timeout=3.0), workers=8)
    outcomes = box.run_many([program_1, program_2, ...], desc="humaneval")   # Outcome per program
    box.isolation.describe()   # which tool isolated them, and what it covers (goes into results)

Each program is written to `main.py` in a fresh temporary directory and run as `__main__` by a
`python -I -S` (the standard library only: no site-packages, no user or environment paths) in its
own session and process group, with stdin closed (/dev/null), a scrubbed environment (PATH, HOME,
LANG, TMPDIR only: nothing of the evaluator's), and these limits set by a trusted stub in that
interpreter just before it runs the program: CPU time (RLIMIT_CPU), address space (RLIMIT_AS),
file size (RLIMIT_FSIZE), open files (RLIMIT_NOFILE) and processes (RLIMIT_NPROC). stdout and
stderr are read as they come and the program is killed once together they pass `output_bytes`;
at the wall-clock deadline, or
as soon as the program exits, the whole group is killed with SIGKILL and reaped, and a sweep of
/proc checks that no process of the sample survives.

The isolation tool is chosen by probing at run time (`probe`), best first:
  bwrap    bubblewrap: new network, pid, ipc and uts namespaces; the filesystem read-only except
           the sample's directory (bound at /tmp/work; /tmp itself a fresh tmpfs); the sandbox dies
           with its parent.
  unshare  util-linux `unshare`: new network and pid namespaces (and a mount namespace where the
           interpreter must be made visible); the filesystem is protected only by the sample's uid.
  rlimits  no namespace works here: the limits, the group kill and (as root) the uid only. The
           network is NOT isolated, and a program that leaves its session escapes the group kill
           unless it runs under its own uid. `probe` warns when it falls back to this.
RLIMIT_NPROC is not enforced for root, so as root every running sample gets a uid of its own
(UID_BASE + a per-process offset + its worker slot; no such user exists) and its directory is
chowned to it. That uid also bounds what it can write (not root's files) and lets the sweep find
processes that left the group. Run as another user, a sample keeps that user's uid: under bwrap
and unshare a user namespace of its own makes RLIMIT_NPROC count only the sample's processes;
under `rlimits` it counts all of that user's processes, and the program could signal the user's
other processes (the evaluator included). docs/evaluation.md has the table.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from deepseekmoe.errors import ConfigError

TOOLS = ("bwrap", "unshare", "rlimits")
UID_BASE = 1_000_000_000
_SLOTS_PER_PROCESS = 256
WORK = "/tmp/work"  # the sample's directory as bubblewrap shows it


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0        # wall-clock seconds per program
    memory_mb: int = 2048        # address space
    file_mb: int = 16            # largest file it may write
    open_files: int = 64
    processes: int = 32          # RLIMIT_NPROC
    output_bytes: int = 1 << 20  # stdout + stderr kept; more kills the program

    def rlimits(self) -> dict[str, int]:
        cpu = int(self.timeout) + 1  # integer seconds; the wall deadline is the tighter bound
        return {"RLIMIT_CPU": cpu, "RLIMIT_AS": self.memory_mb << 20, "RLIMIT_FSIZE": self.file_mb << 20,
                "RLIMIT_NOFILE": self.open_files, "RLIMIT_NPROC": self.processes, "RLIMIT_CORE": 0}


@dataclass
class Outcome:
    status: str                  # passed | failed | timeout | output_limit
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    survivors: int = 0           # processes of the sample still alive after the kill (should be 0)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    tool: str
    network_isolated: bool
    filesystem: str
    own_uid: bool                # each sample runs under a uid of its own (as root)

    def describe(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- the trusted stub
# Runs inside the isolation tool: (unshare as root) makes the interpreter visible to the sample's
# uid, sets the limits, drops to that uid, replaces the environment and runs main.py as __main__
# in the same interpreter (an exec of a second one would double the start-up time per sample).
_STUB = r"""
import json, os, resource, sys
a = json.loads(sys.argv[1])
os.umask(0o022)
for top, prefix, stage in a["remount"]:
    import subprocess
    os.mkdir(stage)
    subprocess.run(["mount", "--bind", prefix, stage], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", top], check=True)
    os.makedirs(prefix, 0o755, exist_ok=True)
    subprocess.run(["mount", "--move", stage, prefix], check=True)
    os.rmdir(stage)
for name, v in a["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (v, v))
import ctypes
ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary escalates
if a["uid"] is not None:
    os.setgroups([])
    os.setresgid(a["uid"], a["uid"], a["uid"])
    os.setresuid(a["uid"], a["uid"], a["uid"])
os.chdir(a["cwd"])
os.environ.clear()
os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": a["cwd"], "TMPDIR": a["cwd"], "LANG": "C.UTF-8"})
sys.argv = ["main.py"]
del a, ctypes, json, resource
import runpy
runpy.run_path("main.py", run_name="__main__")
"""


def _python() -> str:
    """The base interpreter (a venv's python resolves to it; `-I` ignores the venv anyway)."""
    return os.path.realpath(sys.executable)


def _hidden_top(path: str) -> str | None:
    """The highest folder above `path` that other users cannot traverse (/root for a pyenv
    install in root's home), or None when `path` is reachable by any uid."""
    p = Path(path)
    for folder in reversed(p.parents):
        if folder != Path("/") and not os.stat(folder).st_mode & 0o001:
            return str(folder)
    return None


def _prefix() -> str:
    return os.path.realpath(sys.base_prefix)


class Sandbox:
    """Runs programs under one isolation tool (probed, or `tool`) with `limits`, `workers` at a time."""

    def __init__(self, limits: Limits | None = None, workers: int | None = None, tool: str | None = None):
        self.limits = limits or Limits()
        if self.limits.timeout <= 0:
            raise ConfigError(f"sandbox timeout {self.limits.timeout}: must be positive seconds")
        self.workers = max(1, workers or os.cpu_count() or 1)
        if self.workers > _SLOTS_PER_PROCESS:
            raise ConfigError(f"{self.workers} sandbox workers: at most {_SLOTS_PER_PROCESS}")
        self.isolation = probe(tool)

    def run(self, program: str) -> Outcome:
        return run_program(program, self.limits, self.isolation.tool)

    def run_many(self, programs: list[str], desc: str = "sandbox", show_progress: bool = True) -> list[Outcome]:
        """Outcomes in the order of `programs`, run by a pool of `workers` threads (each waits on
        its own subprocess), with a progress bar."""
        from deepseekmoe.eval.scoring import progress

        out: list[Outcome | None] = [None] * len(programs)
        with ThreadPoolExecutor(self.workers) as pool, progress(len(programs), desc, show_progress) as bar:
            futures = {pool.submit(self.run, p): i for i, p in enumerate(programs)}
            for f in futures:
                out[futures[f]] = f.result()
                bar.update(1)
        return out  # type: ignore[return-value]


# Worker slots of this process: each running program holds one, and as root its uid is the slot's.
_SLOTS: queue.Queue[int] = queue.Queue()
for _s in range(_SLOTS_PER_PROCESS):
    _SLOTS.put(_s)


def run_program(program: str, limits: Limits, tool: str) -> Outcome:
    """Run one program under `tool` (one of TOOLS; `probe` chooses) with `limits`."""
    slot = _SLOTS.get()
    work = tempfile.mkdtemp(prefix="deepseekmoe-sandbox-")
    try:
        uid = UID_BASE + (os.getpid() % 3000) * _SLOTS_PER_PROCESS + slot if os.geteuid() == 0 else None
        Path(work, "main.py").write_text(program, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chown(Path(work, "main.py"), uid, uid)
        return _execute(_command(tool, limits, work, uid), limits, uid, cwd=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _SLOTS.put(slot)


def _command(tool: str, limits: Limits, work: str, uid: int | None) -> list[str]:
    python, prefix = _python(), _prefix()
    top = _hidden_top(prefix) if uid is not None else None
    cwd = WORK if tool == "bwrap" else work
    remount = [[top, prefix, str(Path(work, ".stage"))]] if top and tool == "unshare" else []
    args = json.dumps({"rlimits": limits.rlimits(), "uid": uid, "cwd": cwd, "remount": remount})
    stub = [python, "-I", "-S", "-c", _STUB, args]
    if tool == "bwrap":
        ns = (["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
              if uid is not None else ["--unshare-all"])  # as root a user namespace would keep kuid 0
        cmd = ["bwrap", *ns, "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev",
               "--proc", "/proc", "--tmpfs", "/tmp"]
        if top:  # show the interpreter to the sample's uid: a world-traversable tmpfs over `top`
            cmd += ["--perms", "0755", "--tmpfs", top]
            for d in [p for p in reversed(Path(prefix).parents) if str(p).startswith(top + "/")]:
                cmd += ["--perms", "0755", "--dir", str(d)]
            cmd += ["--ro-bind", prefix, prefix]
        cmd += ["--bind", work, WORK, "--chdir", WORK, "--clearenv"]
        if uid is not None:
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return [*cmd, "--", *stub]
    if tool == "unshare":
        ns = ["--net", "--pid", "--fork", "--kill-child"] + (["--mount"] if remount else [])
        return ["unshare", *(ns if uid is not None else ["--user", *ns]), "--", *stub]
    return stub


# ---------------------------------------------------------------------- running and killing
def _execute(cmd: list[str], limits: Limits, uid: int | None, cwd: str) -> Outcome:
    start = time.monotonic()
    deadline = start + limits.timeout
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, close_fds=True, cwd=cwd,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})  # for finding the tool
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        sel.register(f, selectors.EVENT_READ)
    timed_out = over = killed = False
    received = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.get_map():  # both pipes closed: the program may still be running
                try:
                    proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    timed_out = True
                break
            for key, _ in sel.select(min(left, 0.05)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[key.fileobj] += chunk[: max(0, limits.output_bytes - received)]
                received += len(chunk)
                over = received > limits.output_bytes
            if over:
                break
            if proc.poll() is not None and not killed:
                # The program is done; its leftovers (a background child holding the pipes) go now,
                # and the pipes then drain to EOF.
                _kill(proc, uid)
                killed = True
    finally:
        if not killed:
            _kill(proc, uid)
        proc.wait()
        survivors = _wait_gone(proc.pid, uid)
        if survivors:
            warnings.warn(f"{survivors} process(es) of a sandboxed program outlived SIGKILL", RuntimeWarning,
                          stacklevel=2)
        sel.close()
        for f in bufs:
            f.close()
    rc = proc.returncode
    status = ("timeout" if timed_out else "output_limit" if over else "passed" if rc == 0 else "failed")
    return Outcome(status, None if timed_out or over else rc, bufs[proc.stdout].decode("utf-8", "replace"),
                   bufs[proc.stderr].decode("utf-8", "replace"), round(time.monotonic() - start, 3), survivors)


def _kill(proc: subprocess.Popen, uid: int | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone
    for pid in _members(proc.pid, uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited between the scan and the kill


def _members(leader: int, uid: int | None) -> list[int]:
    """Live processes of a sample: in its group or session, or (as root) running under its uid."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
            mine = pgrp == leader or session == leader
            if not mine and uid is not None:
                mine = entry.stat().st_uid == uid
        except (OSError, ValueError):
            continue  # exited while being read
        if mine and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _wait_gone(leader: int, uid: int | None, patience: float = 1.0) -> int:
    """Kill and wait (up to `patience` s) until no process of the sample is left; the count left."""
    end = time.monotonic() + patience
    while True:
        left = _members(leader, uid)
        if not left or time.monotonic() > end:
            return len(left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone
        time.sleep(0.02)


# ---------------------------------------------------------------------- choosing the tool
_PROBED: dict[str, bool] = {}


def _works(tool: str) -> bool:
    """Whether `tool` runs a trivial program here, with the uid a real sample would get."""
    if tool not in _PROBED:
        if tool != "rlimits" and shutil.which(tool) is None:
            _PROBED[tool] = False
        else:
            out = run_program("print('ok')", Limits(timeout=20.0), tool)
            _PROBED[tool] = out.passed and out.stdout.strip() == "ok"
    return _PROBED[tool]


def probe(tool: str | None = None) -> Isolation:
    """The isolation in use: `tool` if given (ConfigError when it does not work here), else the
    first of TOOLS that works; a warning when only `rlimits` is left."""
    if tool is not None and tool not in TOOLS:
        raise ConfigError(f"sandbox tool {tool!r}: choose one of {', '.join(TOOLS)}")
    own_uid = os.geteuid() == 0
    for t in [tool] if tool else TOOLS:
        if not _works(t):
            continue
        if t == "rlimits" and tool is None:
            warnings.warn("no namespace tool works here (bubblewrap missing, unshare refused): generated code "
                          "runs with resource limits only and the network is NOT isolated", RuntimeWarning,
                          stacklevel=2)
        fs = {"bwrap": "read-only, except its own directory",
              "unshare": "uid permissions only" + ("" if own_uid else " (the evaluating user's uid: NOT isolated)"),
              "rlimits": "uid permissions only" + ("" if own_uid else " (the evaluating user's uid: NOT isolated)")}
        return Isolation(t, t != "rlimits", fs[t], own_uid)
    if tool is not None:
        raise ConfigError(f"--sandbox {tool}: it does not work on this machine; install bubblewrap, or pick "
                          f"another of {', '.join(TOOLS)} (or auto)")
    raise ConfigError("no sandbox works on this machine (bubblewrap, unshare and plain resource limits each "
                      "failed a trial run): install bubblewrap to score code tasks, or leave humaneval and mbpp "
                      "out of --tasks")


def available_tools() -> list[str]:
    return [t for t in TOOLS if _works(t)]
