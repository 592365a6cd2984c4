"""A tiny fd holder that keeps the /dev/cachefiles fd alive across daemon restarts.

While any process holds the device fd, the kernel keeps the cache bound and
the pending requests queued (cachefiles_daemon_release() only runs on the
last close), so a restarted daemon can take the fd back and write ``restore``.

Protocol: a Unix stream socket, one request per connection, one reply line:

* ``PUT\\n`` with one fd attached (SCM_RIGHTS) -> ``OK\\n`` (a previously held fd is closed)
* ``GET\\n`` -> ``FD\\n`` with the held fd attached, or ``NONE\\n``
* ``DROP\\n`` -> ``OK\\n`` (closes the held fd, letting the cache unbind)
* ``PING\\n`` -> ``OK <pid>\\n``

Run as ``python -m erofs_domains.programs.ondemand.holder --socket PATH``; it prints
``READY <pid>`` once listening and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

_BUF = 256


class HolderError(OSError):
    """The holder could not be reached or refused the request."""


def _request(path: str, line: bytes, fd: int | None = None,
             timeout: float = 5.0) -> tuple[bytes, list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            if fd is None:
                sock.sendall(line)
            else:
                socket.send_fds(sock, [line], [fd])
            msg, fds, _flags, _addr = socket.recv_fds(
                sock, _BUF, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as exc:
            raise HolderError(exc.errno, f"fd holder at {path}: {exc.strerror or exc}") from exc
    return msg.strip(), fds


def put_fd(path: str, fd: int, timeout: float = 5.0) -> None:
    """Hand ``fd`` (a copy of it) to the holder listening at ``path``."""
    reply, _ = _request(path, b"PUT\n", fd, timeout)
    if reply != b"OK":
        raise HolderError(0, f"fd holder at {path} refused PUT: {reply!r}")


def get_fd(path: str, timeout: float = 5.0) -> int:
    """Fetch a copy of the held fd (close-on-exec set); HolderError if none is held."""
    reply, fds = _request(path, b"GET\n", None, timeout)
    if reply == b"FD" and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    raise HolderError(0, f"fd holder at {path} holds no fd (reply {reply!r})")


def drop_fd(path: str, timeout: float = 5.0) -> None:
    """Make the holder close its fd."""
    _request(path, b"DROP\n", None, timeout)


def ping(path: str, timeout: float = 5.0) -> int:
    """Return the holder's pid."""
    reply, _ = _request(path, b"PING\n", None, timeout)
    return int(reply.split()[1])


def unix_listener(path: str, backlog: int, timeout: float) -> socket.socket:
    """A listening Unix stream socket at ``path`` (a stale one there is replaced); accept()
    times out after ``timeout`` s, so a server loop can check whether to stop."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(backlog)
    sock.settimeout(timeout)
    return sock


class Holder:
    """The holder server; ``serve_forever()`` runs until ``stop()``."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self._stop = threading.Event()
        self._sock = unix_listener(path, 8, 0.2)

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except (TimeoutError, InterruptedError):
                    continue
                with conn:
                    conn.settimeout(5.0)
                    try:
                        self._handle(conn)
                    except OSError:
                        pass  # a client went away mid-request
        finally:
            self.close()

    def _handle(self, conn: socket.socket) -> None:
        msg, fds, _flags, _addr = socket.recv_fds(conn, _BUF, 4, socket.MSG_CMSG_CLOEXEC)
        cmd = msg.strip()
        if cmd == b"PUT" and len(fds) == 1:
            self._set(fds.pop())
            conn.sendall(b"OK\n")
        elif cmd == b"GET" and self.fd is not None:
            socket.send_fds(conn, [b"FD\n"], [self.fd])
        elif cmd == b"GET":
            conn.sendall(b"NONE\n")
        elif cmd == b"DROP":
            self._set(None)
            conn.sendall(b"OK\n")
        elif cmd == b"PING":
            conn.sendall(b"OK %d\n" % os.getpid())
        else:
            conn.sendall(b"ERROR bad request\n")
        for fd in fds:
            os.close(fd)

    def _set(self, fd: int | None) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = fd

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._set(None)
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m erofs_domains.programs.ondemand.holder",
        description="Hold the /dev/cachefiles fd for on-demand daemon failover.")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    args = parser.parse_args(argv)
    try:
        holder = Holder(args.socket)
    except OSError as exc:
        print(f"ERROR {exc.errno or 0} {exc}", flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: holder.stop())
    signal.signal(signal.SIGINT, lambda *_: holder.stop())
    print(f"READY {os.getpid()}", flush=True)
    holder.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
