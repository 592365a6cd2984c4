"""A fake /dev/cachefiles for the daemon's unit tests (no kernel support needed).

The fake device is a SOCK_SEQPACKET socketpair: each send() is one request message for the
daemon's read(), each of the daemon's write()s (commands, copen) arrives as one packet.
Anonymous fds are real fds of this process (the daemon runs in a thread) or, for the CLI
tests, fds passed to the child at the same number; READ targets are O_DIRECT files, so
alignment mistakes fail the way they would on the kernel's anon fd. The fixtures that start
a daemon on it (``start``, ``harness``, ``blobs``, ``sockdir``) are in tests/unit/conftest.py.
"""

from __future__ import annotations

import ctypes
import io
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from erofs_domains.programs.ondemand import protocol as P
from erofs_domains.programs.ondemand.client import DaemonControl
from erofs_domains.programs.ondemand.daemon import OnDemandDaemon
from erofs_domains.programs.ondemand.reqlog import read_request_log

REPO = Path(__file__).resolve().parents[2]
DAEMON = REPO / "tools" / "ondemand-daemon"
PAGE = 4096


class FakeKernel:
    """Plays the kernel side of /dev/cachefiles."""

    def __init__(self):
        self.sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dev_fd = peer.detach()
        self.sock.settimeout(5)
        self._msg_id = 0
        self._object_id = 0

    def _next_msg(self) -> int:
        self._msg_id += 1
        return self._msg_id - 1

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self) -> bytes:
        return self.sock.recv(8192)

    def expect_nothing(self, wait: float = 0.3) -> None:
        self.sock.settimeout(wait)
        try:
            with pytest.raises(TimeoutError):
                self.recv()
        finally:
            self.sock.settimeout(5)

    def open(self, cookie: str | bytes, fd: int, volume: str = "erofs,dom") -> tuple[int, int]:
        self._object_id += 1
        msg_id = self._next_msg()
        self.send(P.encode_open(msg_id, self._object_id, volume, cookie, fd))
        return msg_id, self._object_id

    def read(self, object_id: int, off: int, length: int) -> int:
        msg_id = self._next_msg()
        self.send(P.encode_read(msg_id, object_id, off, length))
        return msg_id

    def close(self, object_id: int) -> int:
        msg_id = self._next_msg()
        self.send(P.encode_close(msg_id, object_id))
        return msg_id


def pipe_anon() -> tuple[int, int]:
    """(reader, anon fd): the reader sees EOF once the daemon closed the anon fd."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_inheritable(w, True)  # like the kernel's anon fd: no O_CLOEXEC
    return r, w


def anon_closed(reader: int) -> bool:
    try:
        return os.read(reader, 1) == b""
    except BlockingIOError:
        return False


def file_anon(path: Path) -> int:
    """A direct-I/O file standing in for the anon fd of a cache file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    os.set_inheritable(fd, True)
    return fd


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def buffer_address(obj) -> int:
    view = _PyBuffer()
    if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(obj), ctypes.byref(view), 0):
        raise OSError("PyObject_GetBuffer failed")
    try:
        return view.buf
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


@dataclass
class Harness:
    daemon: OnDemandDaemon
    kernel: FakeKernel
    ctl: DaemonControl
    log_path: Path
    tmp: Path
    thread: threading.Thread
    ready: io.StringIO
    completions: queue.Queue = field(default_factory=queue.Queue)
    exits: list = field(default_factory=list)

    def entries(self, op: str | None = None) -> list[dict]:
        return [e for e in read_request_log(self.log_path) if op is None or e["op"] == op]

    def open_failed(self, cookie: str) -> bytes:
        """OPEN ``cookie`` with a pipe as its anon fd; the daemon's copen, once it settled with
        the fd closed and no object open (a failed OPEN)."""
        reader, anon = pipe_anon()
        msg_id, _ = self.kernel.open(cookie, anon)
        reply = self.kernel.recv()
        self.ctl.wait_idle()
        assert anon_closed(reader), "the anon fd of a failed OPEN must be closed"
        assert self.ctl.status()["objects"] == {}
        return reply.replace(b"%d" % msg_id, b"{id}", 1)

    def completion(self, timeout: float = 5.0) -> tuple[int, int]:
        return self.completions.get(timeout=timeout)

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
