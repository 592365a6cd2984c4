"""The on-demand daemon as the VM tests use it, one way for every test family.

* ``SharedDaemon``: one ext4 cache and one daemon for a whole test module (a daemon start and
  a cache withdrawal cost seconds under TCG); restarted on the same cache if a test (or the
  watchdog) killed it. Its logs live in the guest's work directory (a request log on the 9p
  results directory slows every request down) and are copied to the results at the end.
* ``DaemonWindow``: what one test sees of a daemon: its control channel and the requests
  logged since the test began (a byte offset of the request log, erofs_domains/programs/ondemand/reqlog.py).
* ``end_test``: how a test's use of a daemon ends, for shared and per-test daemons alike:
  faults cleared, held READs answered, the daemon idle, the test's slice of the log saved.
  What goes wrong is returned, with the daemon's state, to fail the test that left it.
* ``Daemons``: the daemons (and fd holders) one test starts itself, e.g. to kill them.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from erofs_domains.base.scratch import work_root
from erofs_domains.programs.ondemand.client import DaemonControlError
from erofs_domains.programs.ondemand.process import REPO, DaemonProcess
from erofs_domains.programs.ondemand.reqlog import RequestWindow


def work_dir(stem: str) -> Path:
    """A fresh directory in the guest's work directory for daemon logs; `save_logs` moves it
    to the results."""
    from erofs_domains.base.names import unique

    d = work_root() / unique(stem)
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_logs(src: Path, dest: Path) -> None:
    """Copy `src` (files and directories) to `dest`, then remove it."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir() if src.is_dir() else ():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
        elif f.is_dir():
            save_logs(f, dest / f.name)
    shutil.rmtree(src, ignore_errors=True)


def image_blobs(image, fsid: str, devices: dict[str, str] | None = None) -> dict[str, Path]:
    """Cookie name -> blob file to serve `image` under `fsid`: its primary blob under `fsid`,
    its device blobs under their cookie names or renamed through `devices` {old: new}."""
    devices = devices or {}
    return {fsid if name == image.fsid else devices.get(name, name): blob.path for name, blob in image.blobs.items()}


class SharedDaemon:
    """One ext4 cache of `cache_mib` and one daemon (extra arguments `args`) for a module."""

    def __init__(self, name: str, args: list[str], cache_mib: int, workdir: Path, results: Path):
        self.name, self.args, self.cache_mib = name, list(args), cache_mib
        self.workdir, self.results = workdir, results
        self.cache = None
        self.proc: DaemonProcess | None = None
        self.served: dict[str, str] = {}  # cookie name -> path the running daemon serves
        self.starts = 0

    def start(self) -> None:
        from erofs_domains.base.names import unique
        from erofs_domains.guest.fscache.cache import CacheFs

        if self.cache is None:
            self.cache = CacheFs.create(unique("scache"), self.cache_mib)
        self.proc = DaemonProcess(cache_dir=self.cache.mountpoint, workdir=self.workdir, tag=unique("sd"),
                                  extra_args=list(self.args))
        self.served = {}
        self.starts += 1
        self.proc.start()

    def ensure_alive(self) -> None:
        """A test (or the watchdog) may have killed it: start a fresh one on the same cache."""
        from erofs_domains.guest.fscache.cache import wait_withdrawn

        if self.proc is not None and self.proc.alive:
            return
        if self.proc is not None:
            self.proc.stop()
            wait_withdrawn(self.proc.tag)
        self.start()

    def window(self) -> DaemonWindow:
        """A window from now on (the daemon started if it is not running)."""
        self.ensure_alive()
        return DaemonWindow(self.proc, served=self.served)

    def close(self) -> None:
        from erofs_domains.guest.fscache.cache import wait_withdrawn

        try:
            if self.proc is not None:
                self.proc.stop()
                wait_withdrawn(self.proc.tag)
        finally:
            try:
                if self.cache is not None:
                    self.cache.destroy()
            finally:
                save_logs(self.workdir, self.results)


class DaemonWindow(RequestWindow):
    """One test's view of a daemon: its control channel, and the requests it logged since
    `start` (default: now). `served` (cookie -> path) is what the daemon serves already."""

    def __init__(self, proc: DaemonProcess, start: int | None = None, served: dict | None = None):
        super().__init__(proc.log_path, start)
        self.proc = proc
        self.served = {} if served is None else served

    @property
    def control(self):
        return self.proc.control

    @property
    def cache_dir(self) -> Path:
        return Path(self.proc.cache_dir)

    @property
    def alive(self) -> bool:
        return self.proc.alive

    def kill(self) -> None:
        self.proc.kill()

    def serve_blob(self, name: str, path: Path | str) -> str:
        """Serve cookie `name` from `path` (one control call, skipped if already so)."""
        if self.served.get(name) != str(path):
            self.control.add_blob(name, str(path))
            self.served[name] = str(path)
        return name

    def serve_image(self, image, fsid: str | None = None, devices: dict[str, str] | None = None) -> str:
        """Serve `image` with its primary blob under `fsid` (default: a unique name) and its
        device blobs under their cookie names, or renamed through `devices` {old: new}.
        Returns the fsid."""
        from erofs_domains.base.names import unique

        fsid = fsid or unique(image.name[:20] + "-")
        for cookie, path in image_blobs(image, fsid, devices).items():
            self.serve_blob(cookie, path)
        return fsid

    def wait_idle(self, timeout: float = 10.0, quiet: float = 0.05) -> None:
        self.control.wait_idle(timeout=timeout, quiet=quiet)


def end_test(window: DaemonWindow, save_to: Path | None = None) -> list[str]:
    """End a test's use of the daemon: clear its faults, answer the READs it holds (without
    data), wait until it is idle, and save the test's requests (to `save_to`). Returns what
    went wrong, each with the daemon's state and requests: a daemon that is not idle now
    would put this test's requests into the next test's window."""
    errors = []
    if window.alive:
        try:
            st = window.control.status()
            if st["faults"]:
                window.control.clear_faults()
            if st["ignored"]:
                answered = window.control.serve_ignored(with_data=False)
                if answered["errors"]:
                    errors.append(f"held READs could not be answered: {answered['errors']}")
            window.control.wait_idle(timeout=10, quiet=0.1)
        except DaemonControlError as e:
            errors.append(f"the daemon did not settle after the test: {e}")
        if errors:
            try:
                st = window.control.status()
                errors.append("daemon status: " + ", ".join(
                    f"{k}={st[k]}" for k in ("in_flight", "ignored", "faults", "objects", "orphan_fds")))
            except DaemonControlError as e:
                errors.append(f"daemon status unavailable: {e}")
    bad = window.unparsable()
    if errors or bad:
        errors.append(window.render(last=20))
    if save_to is not None:
        window.save(save_to)
    return errors


class Daemons:
    """Daemons (and fd holders) of one test, on the test's cache; stopped at teardown in
    reverse order, then every cache they bound must be withdrawn."""

    def __init__(self, cache_dir: Path, artifacts: Path, work: Path, watchdog):
        self.cache_dir, self.artifacts, self.work, self.watchdog = cache_dir, artifacts, work, watchdog
        self.procs: list[DaemonProcess] = []
        self.holders: list[subprocess.Popen] = []
        self.tags: set[str] = set()

    def start(self, *args: str, tag: str | None = None, name: str | None = None,
              blobs: dict[str, Path] | None = None) -> DaemonProcess:
        """Start a daemon (`blobs` are served from the start, e.g. before a `restore`)."""
        from erofs_domains.base.names import unique

        n = len(self.procs) + 1
        d = DaemonProcess(cache_dir=self.cache_dir, workdir=self.work / (name or f"daemon{n}"),
                          tag=tag or unique("t"), extra_args=list(args), blobs=dict(blobs or {}))
        self.watchdog.register(d.kill)
        self.procs.append(d)
        self.tags.add(d.tag)
        d.start()
        return d

    def holder(self) -> str:
        """Start an fd holder (erofs_domains/programs/ondemand/holder.py); returns its socket path."""
        from erofs_domains.base.names import unique

        path = str(work_root() / f"{unique('h')}.sock")  # a Unix socket path fits in 108 bytes
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "erofs_domains.programs.ondemand.holder", "--socket", path],
                                cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.watchdog.register(proc.kill)
        self.holders.append(proc)
        line = proc.stdout.readline()
        if not line.startswith(b"READY"):
            raise RuntimeError(f"fd holder did not start: {line!r}")
        return path

    def close(self) -> None:
        from erofs_domains.guest.fscache.cache import wait_withdrawn

        try:
            for d in reversed(self.procs):
                d.stop()
            for h in self.holders:
                if h.poll() is None:
                    h.send_signal(signal.SIGTERM)
                    try:
                        h.wait(10)
                    except subprocess.TimeoutExpired:
                        h.kill()
                        h.wait(5)
                if h.stdout:
                    h.stdout.close()
            for tag in self.tags:
                wait_withdrawn(tag)
        finally:
            save_logs(self.work, self.artifacts)
