"""erofs_domains/programs/ondemand/process.py: the exit status of a daemon forked from the fork server.

The watchdog kills a hung test's daemon and waits for it while the test itself waits for it
too. The fork server sends the status once; two threads reading it raced, and the loser's EOF
turned the SIGKILL status (-9) into 255 (seen in a CI run of test_watchdog_kills_...).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

from erofs_domains.programs.ondemand.process import ForkedDaemon


def _sleep_forever():
    time.sleep(600)


def forked_sleeper() -> ForkedDaemon:
    ctx = ForkedDaemon.context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_sleep_forever, name="erofs-ondemand-test")
    proc.start()
    send.close()
    return ForkedDaemon(proc, recv)


def test_two_threads_waiting_for_a_killed_daemon_both_see_sigkill():
    for _ in range(10):
        d = forked_sleeper()
        assert d.poll() is None
        seen: list[int] = []
        waiters = [threading.Thread(target=lambda d=d, seen=seen: seen.append(d.wait(10))) for _ in range(8)]
        for t in waiters:
            t.start()
        time.sleep(0.05)
        d.send_signal(signal.SIGKILL)
        seen.append(d.wait(10))
        for t in waiters:
            t.join(15)
        assert seen == [-signal.SIGKILL] * 9, seen
        assert d.returncode == -signal.SIGKILL


def test_wait_times_out_on_a_live_daemon():
    d = forked_sleeper()
    try:
        t0 = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            d.wait(0.3)
        assert 0.3 <= time.monotonic() - t0 < 2
    finally:
        d.send_signal(signal.SIGKILL)
        assert d.wait(10) == -signal.SIGKILL
