"""The code-execution sandbox against hostile programs, under every namespace tool that works here.

Each hostile program runs between two good ones in one parallel batch (three workers). It exits 0
only if its attack worked, so "the attack failed" and "the sample failed" are the same check; the
good ones must still pass (the evaluation's count is 2 of 3), the hostile one must end within its
wall limit plus a second, and no process of it may be left (a marker in its command line is looked
for in /proc). Only loopback addresses are used: nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from deepseekmoe.errors import ConfigError
from deepseekmoe.eval.sandbox import Limits, Sandbox, available_tools, probe

ISOLATING = [t for t in available_tools() if t != "rlimits"]
if not ISOLATING:
    pytest.skip("neither bubblewrap nor unshare works on this machine: the hostile-program tests need a "
                "network namespace (install bubblewrap)", allow_module_level=True)

TIMEOUT = 1.5
GOOD = "assert sum(range(10)) == 45\nprint('good')\n"


def marker_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # exited while being read
    return found


@pytest.fixture(params=ISOLATING)
def box(request):
    return Sandbox(Limits(timeout=TIMEOUT, memory_mb=1024, processes=16, output_bytes=1 << 16), workers=3,
                   tool=request.param)


def run_hostile(box: Sandbox, program: str, marker: str | None = None):
    """Run [good, hostile, good]; check the count, the time and the leftovers; the hostile outcome."""
    outs = box.run_many([GOOD, textwrap.dedent(program), GOOD], show_progress=False)
    assert [o.passed for o in outs] == [True, False, True], [o.stderr[-300:] for o in outs]
    bad = outs[1]
    assert bad.seconds <= TIMEOUT + 1.0
    assert bad.survivors == 0
    if marker is not None:
        assert marker_processes(marker) == []
    return bad


def test_infinite_loop(box):
    bad = run_hostile(box, "while True:\n    pass\n")
    assert bad.status == "timeout"


def test_fork_bomb(box):
    marker = f"bomb-{uuid.uuid4().hex}"
    bad = run_hostile(box, f"""
        import os, sys
        sys.argv.append({marker!r})
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert bad.status == "timeout"


def test_20gb_allocation(box):
    bad = run_hostile(box, "x = bytearray(20 << 30)\n")
    assert bad.status == "failed" and "MemoryError" in bad.stderr


def test_write_and_delete_outside_its_directory(box):
    folder = Path(tempfile.mkdtemp(prefix="sandbox-canary-"))
    try:
        folder.chmod(0o755)  # ordinary permissions: reachable, not writable by others
        canary = folder / "canary.txt"
        canary.write_text("alive")
        canary.chmod(0o644)
        run_hostile(box, f"""
            import os
            ok = 0
            try:
                open({str(folder / 'new.txt')!r}, "w").write("x"); ok += 1
            except OSError:
                pass
            try:
                os.remove({str(canary)!r}); ok += 1
            except OSError:
                pass
            raise SystemExit(0 if ok else 1)
        """)
        assert canary.read_text() == "alive"
        assert sorted(p.name for p in folder.iterdir()) == ["canary.txt"]
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_socket_to_loopback(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        run_hostile(box, f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
            s.sendall(b"hello")
        """)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()
    assert box.isolation.network_isolated


def test_reading_the_evaluators_environment(box, monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("DSM_TEST_SECRET", secret)
    bad = run_hostile(box, f"""
        import os
        seen = repr(dict(os.environ))
        for pid in ({os.getpid()}, os.getppid()):
            try:
                seen += open(f"/proc/{{pid}}/environ", "rb").read().decode("latin-1")
            except OSError:
                pass
        print(seen)
        raise SystemExit(0 if {secret!r} in seen else 1)
    """)
    assert secret not in bad.stdout and bad.stdout.strip()


def test_background_child_outliving_the_deadline(box):
    marker = f"outlive-{uuid.uuid4().hex}"
    bad = run_hostile(box, f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()  # leave the process group the sandbox kills
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}])
            os._exit(0)
        time.sleep(60)
    """, marker=marker)
    assert bad.status == "timeout"


def test_100mb_to_stdout(box):
    bad = run_hostile(box, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n")
    assert bad.status == "output_limit" and len(bad.stdout) <= box.limits.output_bytes


def test_killing_its_parent(box):
    bad = run_hostile(box, f"""
        import os, signal, time
        for pid in (os.getppid(), {os.getpid()}):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.3)
        raise SystemExit(1)  # alive after the kill: the attack did not take the sandbox down with it
    """)
    assert bad.status in ("failed", "timeout")


def test_no_way_back_to_root(box):
    bad = run_hostile(box, """
        import os
        print([line for line in open("/proc/self/status") if line.startswith(("Uid", "NoNewPrivs"))])
        try:
            os.setuid(0)
        except PermissionError:
            raise SystemExit(1)
    """)
    if os.geteuid() == 0:
        assert "Uid:\\t0\\t" not in bad.stdout  # a uid of its own, not root's
    assert "NoNewPrivs:\\t1" in bad.stdout  # no setuid binary can raise its privileges either


def test_exit_codes_and_output_captured(box):
    quiet = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(0.3)\n"  # closed pipes: still running
    outs = box.run_many(["print('hi')", "import sys; sys.stderr.write('oops'); sys.exit(3)", "raise ValueError",
                         quiet, quiet + "raise SystemExit(4)"], show_progress=False)
    assert [o.status for o in outs] == ["passed", "failed", "failed", "passed", "failed"]
    assert outs[3].seconds >= 0.3 and outs[4].returncode == 4
    assert outs[0].stdout == "hi\n" and outs[1].returncode == 3 and outs[1].stderr == "oops"
    assert "ValueError" in outs[2].stderr


def test_unknown_tool_is_a_user_error():
    with pytest.raises(ConfigError, match="choose one of bwrap, unshare, rlimits"):
        probe("docker")


def test_probe_falls_back_and_says_what_is_lost(monkeypatch):
    from deepseekmoe.eval import sandbox

    monkeypatch.setattr(sandbox, "_PROBED", {"bwrap": False, "unshare": False, "rlimits": True})
    with pytest.warns(RuntimeWarning, match="network is NOT isolated"):
        assert probe().describe()["network_isolated"] is False
    with pytest.raises(ConfigError, match="--sandbox bwrap: it does not work on this machine"):
        probe("bwrap")
    monkeypatch.setattr(sandbox, "_PROBED", {"bwrap": False, "unshare": False, "rlimits": False})
    with pytest.raises(ConfigError, match="no sandbox works on this machine"):
        probe()
