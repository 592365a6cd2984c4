"""cmd() and wait_for(): what they return, and what their errors say."""

import subprocess
import sys
import time

import pytest

from erofs_domains.base.proc import CmdError, WaitTimeout, cmd, wait_for

PY = sys.executable


def test_cmd_returns_output():
    r = cmd([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n")


def test_cmd_failure_names_command_status_stdout_and_stderr():
    with pytest.raises(CmdError) as ei:
        cmd([PY, "-c", "import sys; print('some out'); print('some err', file=sys.stderr); sys.exit(3)"])
    e = ei.value
    assert isinstance(e, subprocess.CalledProcessError)
    assert e.returncode == 3
    msg = str(e)
    assert "exit status 3" in msg and PY in msg and "sys.exit(3)" in msg
    assert "STDOUT: some out" in msg and "STDERR: some err" in msg


def test_cmd_check_false_returns_failure():
    r = cmd([PY, "-c", "import sys; sys.exit(2)"], check=False)
    assert r.returncode == 2


def test_cmd_missing_program():
    with pytest.raises(CmdError) as ei:
        cmd(["/nonexistent/program-xyz", "arg"])
    assert ei.value.returncode is None
    assert "could not start" in str(ei.value) and "/nonexistent/program-xyz arg" in str(ei.value)


def test_cmd_timeout_kills_and_says_so():
    t0 = time.monotonic()
    with pytest.raises(CmdError) as ei:
        cmd([PY, "-c", "import time; print('started', flush=True); time.sleep(30)"], timeout=1)
    assert time.monotonic() - t0 < 10
    assert ei.value.returncode is None and "timed out after 1 s" in str(ei.value)


def test_cmd_input_cwd_env_and_bytes(tmp_path):
    r = cmd([PY, "-c", "import os, sys; sys.stdout.write(os.getcwd() + ' ' + os.environ['X'] + ' ' + "
             "sys.stdin.read())"], cwd=tmp_path, env={"X": "y"}, input="z")
    assert r.stdout == f"{tmp_path} y z"
    assert cmd([PY, "-c", "print('b')"], text=False).stdout == b"b\n"


def test_cmd_long_output_is_clipped_in_the_message():
    with pytest.raises(CmdError) as ei:
        cmd([PY, "-c", "import sys; print('x' * 100000 + 'END'); sys.exit(1)"])
    msg = str(ei.value)
    assert len(msg) < 10000 and "END" in msg and "characters cut" in msg


def test_wait_for_returns_the_value():
    calls = []

    def probe():
        calls.append(1)
        return len(calls)

    assert wait_for(probe, what="three calls", timeout=5, until=lambda n: n >= 3, step=0.001) == 3


def test_wait_for_timeout_names_what_and_last_value():
    with pytest.raises(WaitTimeout) as ei:
        wait_for(lambda: {"state": "A"}, what="the cache to be withdrawn", timeout=0.2, step=0.01,
                 until=lambda v: v["state"] == "-")
    msg = str(ei.value)
    assert "waiting for the cache to be withdrawn" in msg and "{'state': 'A'}" in msg
    assert ei.value.last == {"state": "A"}
    assert isinstance(ei.value, TimeoutError)


def test_wait_for_probes_once_more_after_the_deadline():
    # a probe slower than the timeout still gets its answer looked at
    assert wait_for(lambda: time.sleep(0.3) or "ok", what="slow probe", timeout=0.1) == "ok"


def test_wait_for_ignores_listed_exceptions_and_shows_the_last_one():
    def probe():
        raise FileNotFoundError(2, "No such file", "/proc/fs/fscache/stats")

    with pytest.raises(WaitTimeout) as ei:
        wait_for(probe, what="stats", timeout=0.1, step=0.01, ignore=(FileNotFoundError,))
    assert "FileNotFoundError" in str(ei.value) and "/proc/fs/fscache/stats" in str(ei.value)
    with pytest.raises(ValueError):
        wait_for(lambda: int("x"), what="a number", timeout=1)


def test_wait_for_custom_show():
    with pytest.raises(WaitTimeout) as ei:
        wait_for(lambda: [1, 2], what="empty list", timeout=0.05, until=lambda v: not v,
                 show=lambda v: f"{len(v)} left")
    assert str(ei.value).endswith("last observed: 2 left")
