"""erofs_domains/host/guard.py and GuestRun.run: a guest that oopses, wedges or outlives its
controller is ended, and says why with its console lines.

Before these, a kernel BUG in the umount path left both VMs wedged (every later mount in D
state), the run hung past -x and the test watchdog, and both qemu processes outlived the
stopped controller. The fake "vng" here is a shell script that, like vng, forks a child
(the "qemu") and prints console lines on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from erofs_domains.host import guard, vm

REPO = Path(__file__).resolve().parents[2]

BUG_TRACE = """\
[   41.102030] erofs (device erofs3): unmounting
[   41.201000] ------------[ cut here ]------------
[   41.201001] kernel BUG at fs/erofs/fscache.c:624!
[   41.201500] Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
[   41.201600] RIP: 0010:erofs_fscache_unregister_cookie+0x9d/0xb0
[   41.201700] Call Trace:
[   41.201800]  erofs_put_super+0x3a/0x50
[   41.201900]  generic_shutdown_super+0x7c/0x180
[   41.202000] ---[ end trace 0000000000000000 ]---
"""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


# ----------------------------------------------------------------- console scan
def test_console_scan_keeps_the_lines_around_a_bug_and_is_due_after_the_trace_ends():
    scan = guard.ConsoleScan(settle=3, max_wait=20, before=2)
    for i, line in enumerate(BUG_TRACE.splitlines(keepends=True)):
        scan.feed(line, now=100 + i * 0.01)
    assert scan.crashed
    assert scan.headline().endswith("kernel BUG at fs/erofs/fscache.c:624!")
    assert scan.lines[0].endswith("unmounting\n"), "the lines before the BUG are kept"
    assert scan.lines[-1].strip().endswith("---[ end trace 0000000000000000 ]---")
    assert not scan.due(100.1), "ended before the trace settled"
    assert scan.due(103.2)


def test_console_scan_gives_up_waiting_for_the_end_of_a_cut_off_trace():
    scan = guard.ConsoleScan(settle=3, max_wait=20)
    scan.feed("[    9.1] BUG: kernel NULL pointer dereference, address: 0000000000000008\n", now=10)
    assert not scan.due(29)
    assert scan.due(30.5)


@pytest.mark.parametrize("line", [
    "[    5.0] WARNING: CPU: 1 PID: 77 at fs/fscache/cookie.c:979 fscache_relinquish_cookie+0x1\n",
    "[    5.0] BUG: KASAN: slab-use-after-free in cachefiles_ondemand_daemon_read+0x2\n",
    "[    5.0] erofs: (device erofs1): mounted with root inode @ nid 36.\n",
    "watchdog: t.py::test_x: test exceeded 120 s; killed its on-demand daemon(s)\n",
], ids=["warn", "kasan", "info", "watchdog"])
def test_console_scan_lets_warnings_and_reports_the_tests_check_pass(line):
    scan = guard.ConsoleScan()
    scan.feed(line, now=1)
    assert not scan.crashed and not scan.due(1000)


# ----------------------------------------------------------------- test clock
def test_test_clock_is_overdue_only_past_the_bound_of_the_test_still_running(tmp_path):
    state = tmp_path / "worker.state"
    clock = guard.TestClock(state)
    assert clock.overdue(0) is None, "no file yet"
    guard.write_state(state, "tests/fscache/test_domains.py::test_shared", 170)
    assert clock.overdue(10) is None
    assert clock.overdue(179) is None
    why = clock.overdue(181)
    assert why and "test_shared" in why and "170 s" in why
    guard.write_state(state)  # the test ended: no bound while the worker waits for work
    assert clock.overdue(10_000) is None
    guard.write_state(state, "tests/fscache/test_domains.py::test_next", 170)
    assert clock.overdue(10_001) is None, "a new test starts its own clock"
    assert json.loads(state.read_text())["test"].endswith("test_next")


# ----------------------------------------------------------------- GuestRun.run with a fake vng
@pytest.fixture
def fake_guest(tmp_path, monkeypatch):
    """A GuestRun whose "vng" is a script: `make(body)` -> (run, pidfile of its "qemu")."""
    monkeypatch.setattr(vm.deps, "check", lambda *a: None)
    monkeypatch.setenv("EROFS_TEST_ACCEL", "tcg")
    vm.kvm_usable.cache_clear()
    monkeypatch.setattr(vm.sys, "stdin", open(os.devnull))  # noqa: SIM115 (pytest's has no fd)
    monkeypatch.setattr(vm.sys, "stdout", open(os.devnull, "w"))  # noqa: SIM115
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"x")

    def make(body: str, **kw):
        script = tmp_path / "vng"
        script.write_text("#!/bin/sh\nsleep 600 &\necho $! > " + str(tmp_path / "qemu.pid") + "\n" + body)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setattr(vm.GuestRun, "vng_argv", lambda self: [str(script)])
        return vm.GuestRun(kernel=kernel, command=["true"], console_log=tmp_path / "worker-1-2.log", **kw)

    yield make
    vm.kvm_usable.cache_clear()


def test_a_guest_that_bugs_and_wedges_is_ended_with_the_bug_lines(fake_guest, tmp_path):
    trace = BUG_TRACE.replace("'", "")
    run = fake_guest(f"printf '%s' '{trace}' >&2\nwait\n")  # prints the BUG, then hangs
    t0 = time.monotonic()
    rc = run.run()
    took = time.monotonic() - t0
    assert rc != 0
    # The fake guest would hang 600 s; the scan ends it 3 s after the trace (plus a loaded host).
    assert took < 30, f"the wrapper waited {took:.0f} s on a guest that had BUGged"
    qemu = int((tmp_path / "qemu.pid").read_text())
    assert wait_gone(qemu, 15), "the guest's qemu outlived the wrapper"
    crash = (tmp_path / "worker-1-2.crash").read_text()
    assert "the guest kernel crashed (" in crash and "kernel BUG at fs/erofs/fscache.c:624!" in crash
    assert "erofs_put_super" in crash and "end trace" in crash, crash


def test_a_test_past_its_bound_ends_the_guest_with_its_last_console_lines(fake_guest, tmp_path):
    state = tmp_path / "worker.state"
    run = fake_guest("echo 'INFO: task umount:312 blocked for more than 120 seconds.' >&2\n"
                     f"echo '{{\"test\": \"t.py::test_stuck\", \"bound\": 1}}' > {state}\nwait\n",
                     state_file=state)
    t0 = time.monotonic()
    rc = run.run()
    assert rc != 0 and time.monotonic() - t0 < 30
    crash = (tmp_path / "worker-1-2.crash").read_text()
    assert "t.py::test_stuck was still running after 1 s" in crash
    assert "blocked for more than 120 seconds" in crash, crash


def test_a_guest_past_its_lifetime_is_ended(fake_guest, tmp_path):
    run = fake_guest("wait\n", lifetime=1)
    t0 = time.monotonic()
    assert run.run() != 0 and time.monotonic() - t0 < 30
    assert "EROFS_TEST_VM_LIFETIME" in (tmp_path / "worker-1-2.crash").read_text()


def test_a_guest_that_ends_well_leaves_no_crash_report(fake_guest, tmp_path):
    run = fake_guest("kill $(cat " + str(tmp_path / "qemu.pid") + ")\necho 'reboot: Power down' >&2\nexit 0\n")
    assert run.run() == 0
    assert not (tmp_path / "worker-1-2.crash").exists()


# ----------------------------------------------------------------- no VM outlives its controller
WRAPPER = textwrap.dedent("""\
    import os, sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from erofs_domains.host import vm
    vm.deps.check = lambda *a: None
    os.environ["EROFS_TEST_ACCEL"] = "tcg"
    vm.GuestRun.vng_argv = lambda self: [{vng!r}]
    sys.exit(vm.GuestRun(kernel=Path({kernel!r}), command=["true"], console_log=Path({log!r})).run())
""")
CONTROLLER = textwrap.dedent("""\
    import subprocess, sys, time
    p = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    print(p.pid, flush=True)
    time.sleep(600)
""")


@pytest.fixture
def controller(tmp_path):
    """A fake pytest controller running a wrapper (GuestRun.run) of a fake vng+qemu that
    never ends. Yields (controller, wrapper pid, qemu pid)."""
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"x")
    vng = tmp_path / "vng"
    vng.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {tmp_path}/qemu.pid\nwait\n")
    vng.chmod(0o755)
    code = WRAPPER.format(repo=str(REPO), vng=str(vng), kernel=str(kernel), log=str(tmp_path / "w-1.log"))
    ctl = subprocess.Popen([sys.executable, "-c", CONTROLLER, code], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, text=True, start_new_session=True)
    wrapper = int(ctl.stdout.readline())
    deadline = time.monotonic() + 60
    while not (tmp_path / "qemu.pid").exists() or not (tmp_path / "qemu.pid").read_text().strip():
        assert time.monotonic() < deadline, "the fake VM did not start"
        time.sleep(0.1)
    qemu = int((tmp_path / "qemu.pid").read_text())
    yield ctl, wrapper, qemu
    for pid in (qemu, wrapper):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    if ctl.poll() is None:
        ctl.kill()
    ctl.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_vm_outlives_its_controller(controller, sig):
    ctl, wrapper, qemu = controller
    ctl.send_signal(sig)
    ctl.wait()
    assert wait_gone(qemu, 15), f"the VM outlived its controller ({sig.name})"
    assert wait_gone(wrapper, 15)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_vm_outlives_its_wrapper(controller, sig):
    _, wrapper, qemu = controller
    os.kill(wrapper, sig)
    assert wait_gone(qemu, 15), f"the VM outlived its wrapper ({sig.name})"
