"""Fixtures of the daemon's unit tests: a daemon (in a thread) on the fake device of
fake_device.py, with blobs and a control socket."""

from __future__ import annotations

import io
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from erofs_domains.base import config
from erofs_domains.programs.ondemand.client import DaemonControl
from erofs_domains.programs.ondemand.daemon import OnDemandDaemon
from tests.unit.fake_device import PAGE, FakeKernel, Harness

# Property tests of pure functions: no per-example deadline and no too_slow health check (a
# loaded CI machine is not a slow function); the same examples on every CI run.
settings.register_profile("unit", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          derandomize=bool(os.environ.get("CI")))
settings.load_profile("unit")


@pytest.fixture(autouse=True)
def fresh_run_config():
    """Each test reads the run configuration from the environment as it (monkeypatch) left it:
    a setting is resolved once per process, and a unit test stands for a fresh process."""
    config.forget()
    yield
    config.forget()


@pytest.fixture
def sockdir():
    """A fresh directory for Unix sockets (AF_UNIX paths must stay short: not under tmp_path)."""
    d = tempfile.mkdtemp(prefix="sock-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def blobs(tmp_path):
    d = tmp_path / "blobs"
    d.mkdir()
    data = {"blob1": os.urandom(10000), "blob2": os.urandom(3 * PAGE), "big": os.urandom(3 * 2**20 + 123)}
    for name, content in data.items():
        (d / name).write_bytes(content)
    return d, data


@pytest.fixture
def start(tmp_path, sockdir, blobs):
    """start(**daemon_kwargs) -> Harness with the daemon bound to a FakeKernel."""
    started = []

    def _start(**kwargs) -> Harness:
        kernel = FakeKernel()
        cache = tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        completions: queue.Queue = queue.Queue()
        exits: list = []
        opts = {"tag": "t", "blobs_dir": str(blobs[0]), "log_path": str(tmp_path / "requests.jsonl"),
                "control_path": str(sockdir / "ctl"), "dev_fd": kernel.dev_fd, "fill_granularity": 4 * PAGE,
                "read_complete": lambda fd, msg_id: completions.put((fd, msg_id)), "exit_fn": exits.append}
        opts.update(kwargs)
        daemon = OnDemandDaemon(str(cache), **opts)
        out = io.StringIO()
        thread = threading.Thread(target=daemon.run, args=(out,), daemon=True)
        thread.start()
        harness = Harness(daemon, kernel, DaemonControl(opts["control_path"], timeout=10),
                    Path(opts["log_path"]), tmp_path, thread, out, completions, exits)
        started.append(harness)
        deadline = time.monotonic() + 5
        while "\n" not in out.getvalue() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return harness

    yield _start
    for harness in started:
        harness.stop()


@pytest.fixture
def harness(start) -> Harness:
    harness = start()
    assert harness.ready.getvalue() == f"READY {os.getpid()}\n"
    if not harness.daemon.device.bound:
        assert [harness.kernel.recv() for _ in range(3)] == [
            f"dir {harness.tmp / 'cache'}".encode(), b"tag t", b"bind ondemand"]
    return harness
