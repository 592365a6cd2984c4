"""Start and stop the on-demand daemon as its own process, as the fixtures use it."""

import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base import config
from erofs_domains.base.layout import REPO
from erofs_domains.base.proc import terminate
from erofs_domains.base.scratch import work_root
from erofs_domains.programs.ondemand.client import DaemonControl
from erofs_domains.programs.ondemand.device import DaemonStartError
from erofs_domains.programs.ondemand.reqlog import RequestWindow

COMM = b"erofs-ondemand"  # the daemon's /proc/<pid>/comm: how the leak check finds it


def set_comm(name: bytes = COMM) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME


class ExecDaemon:
    """The daemon as `python -m erofs_domains.programs.ondemand` (a fresh interpreter: ~7 s under TCG)."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid

    def readline(self, timeout: float) -> str | None:
        r, _, _ = select.select([self.popen.stdout], [], [], timeout)
        return self.popen.stdout.readline().decode() if r else None

    def poll(self):
        return self.popen.poll()

    def wait(self, timeout=None):
        return self.popen.wait(timeout)

    def send_signal(self, sig):
        self.popen.send_signal(sig)

    @property
    def returncode(self):
        return self.popen.returncode


def _exec_daemon(argv: list[str], stderr_path: Path) -> ExecDaemon:
    with open(stderr_path, "ab") as err:
        popen = subprocess.Popen([sys.executable, "-m", "erofs_domains.programs.ondemand", *argv], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    return ExecDaemon(popen)


class _LinesToPipe:
    """sys.stdout of a forked daemon: complete lines go to the parent over a pipe."""

    def __init__(self, conn):
        self.conn, self.buf = conn, ""

    def write(self, text):
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.conn.send(line + "\n")
        return len(text)

    def flush(self):
        pass


def _forked_main(argv, stderr_path, conn):
    """Runs in a child of the fork server: the daemon modules are already imported there."""
    fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stdout = _LinesToPipe(conn)
    set_comm()
    os.chdir(REPO)
    from erofs_domains.programs.ondemand.__main__ import main

    sys.exit(main(argv))


class ForkedDaemon:
    """The daemon forked from a fork server that imported its modules once per worker:
    starting a fresh interpreter for each test costs ~7 s under TCG, a fork a fraction."""

    _ctx = None

    @classmethod
    def context(cls):
        if cls._ctx is None:
            import multiprocessing

            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([f"{__package__}.__main__", f"{__package__}.daemon"])
            cls._ctx = ctx
        return cls._ctx

    @classmethod
    def start(cls, argv: list[str], stderr_path: Path) -> "ForkedDaemon":
        ctx = cls.context()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_forked_main, args=(argv, str(stderr_path), send), name="erofs-ondemand")
        proc.start()
        send.close()
        return cls(proc, recv)

    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn
        self.pid = proc.pid
        # The exit status arrives once, as bytes on the sentinel pipe from the fork server: two
        # threads polling together (a test waiting while the watchdog kills) both read it, and
        # the loser's EOF overwrites it with 255 (multiprocessing popen_forkserver.poll()).
        self._status_lock = threading.Lock()

    def readline(self, timeout: float) -> str | None:
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            time.sleep(timeout)
        return None

    def poll(self):
        with self._status_lock:
            return self.proc.exitcode

    def wait(self, timeout=None):
        from multiprocessing.connection import wait as wait_ready

        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("on-demand daemon", timeout)
            wait_ready([self.proc.sentinel], 0.2 if left is None else min(0.2, left))
        return code

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    @property
    def returncode(self):
        return self.proc.exitcode


@dataclass
class DaemonProcess:
    """`tools/ondemand-daemon` bound to `cache_dir`; `control` talks to its control socket."""

    cache_dir: Path
    workdir: Path
    tag: str = "erofs-test"
    blobs: dict[str, Path] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    proc: "ForkedDaemon | ExecDaemon | None" = None
    control: DaemonControl | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon-requests.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "daemon-stderr.log"

    @property
    def control_path(self) -> Path:
        # Not in workdir: a Unix socket path must fit in 108 bytes.
        return work_root() / f"{self.tag}.sock"

    def argv(self) -> list[str]:
        argv = ["--cache", str(self.cache_dir), "--tag", self.tag, "--log", str(self.log_path),
                "--control", str(self.control_path), *self.extra_args]
        for name, path in self.blobs.items():
            argv += ["--blob", f"{name}={path}"]
        return argv

    def start(self, timeout: float = 30.0) -> "DaemonProcess":
        """Returns once the daemon reported `READY` (its `bind ondemand` succeeded)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.control_path.parent.mkdir(parents=True, exist_ok=True)
        self.control_path.unlink(missing_ok=True)
        if config.current().daemon_spawn == "exec":
            self.proc = _exec_daemon(self.argv(), self.stderr_path)
        else:
            self.proc = ForkedDaemon.start(self.argv(), self.stderr_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.readline(0.2)
            if line is None:
                if self.proc.poll() is not None:
                    raise DaemonStartError(None, f"on-demand daemon exited {self.proc.returncode} before READY:\n"
                                           f"{self.stderr_path.read_text()[-2000:]}")
                continue
            if line.startswith("READY"):
                break
            self.proc.wait(5)
            raise DaemonStartError(None, f"on-demand daemon failed to bind: {line.strip()}\n"
                                   f"{self.stderr_path.read_text()[-2000:]}")
        else:
            self.kill()
            raise DaemonStartError(None, f"on-demand daemon not READY after {timeout} s")
        self.control = DaemonControl(str(self.control_path))
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def window(self, start: int | None = 0) -> RequestWindow:
        """Its request log from ``start`` (default: all of it; None: from now on)."""
        return RequestWindow(self.log_path, start)

    def requests(self, op: str | None = None) -> list[dict]:
        """Every request it logged (of ``op`` only)."""
        return self.window().requests(op=op)

    def serve(self, *images) -> None:
        """Make the daemon serve every blob of these images (cookie name -> file)."""
        for image in images:
            for name, blob in image.blobs.items():
                self.control.add_blob(name, str(blob.path))

    def render(self, last: int = 40) -> str:
        return self.window().render(last)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (clean shutdown: closes anon fds and the dev fd), SIGKILL after `timeout`."""
        return None if self.proc is None else terminate(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL: the kernel then fails every pending request with EIO (cachefiles_flush_reqs)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
