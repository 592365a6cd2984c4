"""The blob server as a child process (`python -m erofs_domains.programs.blobserver`), in a network
namespace (`erofs_domains.programs.netns.VethNamespace`) if given."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erofs_domains.base.layout import REPO
from erofs_domains.base.proc import WaitTimeout, terminate, wait_for
from erofs_domains.programs.blobserver.blobs import DEFAULT_REPO, blob_url, publish
from erofs_domains.programs.blobserver.client import BlobServerClient


class BlobServerStartError(RuntimeError):
    pass


@dataclass
class BlobServerProcess:
    """`python -m erofs_domains.programs.blobserver` as a child process, inside `netns` (a
    `erofs_domains.programs.netns.VethNamespace`, which also ends it at its close) if given."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 0
    admin_socket: Path | None = None
    netns: Any = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    url: str | None = None

    def start(self, timeout: float = 60.0) -> BlobServerProcess:
        """Returns once the server printed READY (listening)."""
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "erofs_domains.programs.blobserver", "--root", str(self.root),
                "--listen", f"{self.host}:{self.port}"]
        if self.admin_socket:
            Path(self.admin_socket).parent.mkdir(parents=True, exist_ok=True)
            argv += ["--admin-socket", str(self.admin_socket)]
        stderr = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        kw = {"stdout": subprocess.PIPE, "stderr": stderr, "stdin": subprocess.DEVNULL, "cwd": REPO}
        try:
            self.proc = self.netns.popen(argv, **kw) if self.netns is not None else subprocess.Popen(argv, **kw)
        finally:
            if self.log_path:
                stderr.close()
        try:
            line = wait_for(self._ready_line, what="the blob server's READY line", timeout=timeout, step=0,
                            until=lambda v: v is not None)
        except WaitTimeout:
            line = b""
        if not line.startswith(b"READY "):
            self.stop()
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
            raise BlobServerStartError(f"blob server did not start (got {line!r}, exit {self.proc.returncode}):\n{log}")
        self.url = line.split()[1].decode()
        return self

    def _ready_line(self) -> bytes | None:
        """The first line on stdout, b"" if the process exited, None while neither (0.2 s)."""
        if select.select([self.proc.stdout], [], [], 0.2)[0]:
            return self.proc.stdout.readline()
        return None if self.proc.poll() is None else b""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def client(self) -> BlobServerClient:
        if self.admin_socket:
            return BlobServerClient(admin_socket=self.admin_socket)
        return BlobServerClient(url=self.url)

    def blob_url(self, digest: str, repo: str = DEFAULT_REPO) -> str:
        return blob_url(self.url, digest, repo)

    def publish(self, path: str | os.PathLike, digest: str | None = None) -> str:
        return publish(self.root, path, digest)

    def stop(self, timeout: float = 10.0) -> int | None:

        if self.proc is None:
            return None
        terminate(self.proc, timeout)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.netns is not None and self.proc in self.netns.procs:
            self.netns.procs.remove(self.proc)
        return self.proc.returncode

    def __enter__(self) -> BlobServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
