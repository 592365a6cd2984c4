"""The blob server in this process (`BlobServer`): HTTP/1.1 with keep-alive on (host, port)
and, optionally, the admin API on a Unix socket; blob answers (HEAD, GET, single ranges),
the admin routes, and the faults of erofs_domains/programs/blobserver/faults.py applied to blob answers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from erofs_domains.programs.blobserver.blobs import DEFAULT_REPO, blob_path, blob_url
from erofs_domains.programs.blobserver.client import BlobServerClient
from erofs_domains.programs.blobserver.faults import Fault, Faults
from erofs_domains.programs.blobserver.ranges import ByteRange, Unsatisfiable, parse_range
from erofs_domains.programs.blobserver.stats import Stats

_BLOB_RE = re.compile(r"^/v2/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)/blobs/sha256:(?P<hex>[0-9a-f]{64})$")
_CHUNK = 64 << 10


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "erofs-test-blobserver/1"
    timeout = 60  # idle keep-alive connections end after a minute

    app: BlobServer  # the server's BlobServer, set in setup()

    def setup(self) -> None:
        super().setup()
        self.app = self.server.app
        self.app._track(self.connection, True)
        self._counted = False  # counted as a connection at its first blob request

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.app._track(self.connection, False)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.app.verbose:
            sys.stderr.write(f"blobserver {self.address_string()} {fmt % args}\n")

    # ----------------------------------------------------------------- routing

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/_admin/"):
            self._admin(method, path)
        elif method not in ("GET", "HEAD") or self.server is not self.app._http:
            self._json(405, {"errors": [{"code": "UNSUPPORTED", "message": f"{method} {path}"}]})
        elif path in ("/v2", "/v2/"):
            self._json(200, {}, headers={"Docker-Distribution-API-Version": "registry/2.0"})
        elif m := _BLOB_RE.match(path):
            self._blob(method, m["repo"], "sha256:" + m["hex"])
        else:
            self._json(404, {"errors": [{"code": "NAME_UNKNOWN", "message": f"no route for {path}"}]})

    def _json(self, status: int, body: Any, headers: dict | None = None, method: str = "GET") -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    # ----------------------------------------------------------------- admin

    def _admin(self, method: str, path: str) -> None:
        app = self.app
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null") if length else None
            if (method, path) == ("GET", "/_admin/stats"):
                reply = app.stats.snapshot()
            elif (method, path) == ("POST", "/_admin/reset"):
                app.stats.reset()
                reply = {}
            elif (method, path) == ("GET", "/_admin/faults"):
                reply = {"faults": app.faults.list()}
            elif (method, path) == ("POST", "/_admin/faults"):
                if not isinstance(body, dict):
                    raise ValueError("POST /_admin/faults needs a JSON object")
                reply = {"fault": app.faults.add(Fault.from_json(body)).to_json()}
            elif (method, path) == ("DELETE", "/_admin/faults"):
                app.faults.clear()
                reply = {}
            elif (method, path) == ("GET", "/_admin/ping"):
                reply = {"pid": os.getpid(), "url": app.url}
            else:
                self._json(404, {"error": f"no admin route {method} {path}"})
                return
        except (ValueError, TypeError) as e:
            self._json(400, {"error": str(e)})
            return
        self._json(200, reply)

    # ----------------------------------------------------------------- blobs

    def _blob(self, method: str, repo: str, digest: str) -> None:
        if not self._counted:
            self._counted = True
            self.app.stats.connection()
        stats = self.app.stats
        entry = stats.begin(method, digest, repo=repo, range=self.headers.get("Range"), peer=self.address_string())
        try:
            try:
                f = open(blob_path(self.app.root, digest), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                stats.answer(entry, 404)
                self._json(404, {"errors": [{"code": "BLOB_UNKNOWN", "message": digest}]}, method=method)
                return
            with f:
                size = os.fstat(f.fileno()).st_size
                taken = self.app.faults.take(method, digest)
                if taken:
                    self._faulty(entry, method, digest, f, size, *taken)
                    return
                try:
                    rng = parse_range(self.headers.get("Range"), size) if method == "GET" else None
                except Unsatisfiable as e:
                    stats.answer(entry, 416)
                    stats.note(entry, error=str(e))
                    self._json(416, {"errors": [{"code": "RANGE_INVALID", "message": str(e)}]},
                               headers={"Content-Range": f"bytes */{size}"})
                    return
                self._head(entry, 206 if rng else 200, digest, rng or ByteRange(0, size), size)
                if method == "GET":
                    self._send_file(entry, f, *(rng or ByteRange(0, size)).span)
        except OSError as e:  # the client went away mid-answer
            stats.note(entry, error=f"{type(e).__name__}: {e}")
            self.close_connection = True

    def _head(self, entry: dict, status: int, digest: str, rng: ByteRange, size: int, *,
              length: int | None = None, fault: str | None = None, content_range: str | None = None) -> None:
        """Status line and headers of a blob answer (Content-Range for 206)."""
        self.app.stats.answer(entry, status, fault)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(rng.length if length is None else length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Docker-Content-Digest", digest)
        self.send_header("ETag", f'"{digest}"')
        if status == 206:
            self.send_header("Content-Range", content_range or rng.content_range(size))
        if fault:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send_file(self, entry: dict, f, start: int, length: int) -> None:
        done = 0
        while done < length:
            chunk = os.pread(f.fileno(), min(_CHUNK, length - done), start + done)
            if not chunk:
                break
            self.app.stats.sent(entry, len(chunk))
            self.wfile.write(chunk)
            done += len(chunk)

    def _faulty(self, entry: dict, method: str, digest: str, f, size: int, fault: Fault,
                release: threading.Event) -> None:
        """Misbehave as `fault` says."""
        p, mode, stats = fault.params, fault.mode, self.app.stats
        body = method == "GET"
        if mode == "status":
            status = int(p.get("status", 503))
            stats.answer(entry, status, mode)
            self._json(status, {"errors": [{"code": "INJECTED", "message": f"injected {status}"}]}, method=method)
            return
        self.close_connection = True  # every other mode breaks the framing or the exchange
        try:
            rng = parse_range(self.headers.get("Range"), size) if body else None
        except Unsatisfiable:
            rng = None
        status = 206 if rng else 200
        rng = rng or ByteRange(0, size)
        if mode in ("close", "stall"):
            if mode == "close" or p.get("after_bytes") is None:  # no answer at all
                stats.answer(entry, 0, mode)
            else:  # the headers and `after_bytes` of the body
                self._head(entry, status, digest, rng, size, fault=mode)
                if body:
                    self._send_file(entry, f, rng.start, min(int(p["after_bytes"]), rng.length))
            if mode == "stall":
                release.wait(float(p.get("seconds", 3600)))
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        elif mode == "short_body":
            self._head(entry, status, digest, rng, size, fault=mode)
            if body:
                self._send_file(entry, f, rng.start, int(rng.length * float(p.get("fraction", 0.5))))
        elif mode == "wrong_length":
            n = max(0, rng.length + int(p.get("delta", -512)))
            self._head(entry, status, digest, rng, size, length=n, fault=mode)
            if body:
                self._send_file(entry, f, rng.start, n)
                pad = n - entry["bytes"]
                if pad > 0:  # past the end of the blob
                    stats.sent(entry, pad)
                    self.wfile.write(bytes(pad))
        else:  # wrong_range: a consistent 206 for bytes the client did not ask for
            start = min(max(0, rng.start + int(p.get("shift", 4096))), max(0, size - 1))
            other = ByteRange(start, min(size, start + rng.length))
            self._head(entry, 206, digest, other, size, fault=mode,
                       content_range=other.content_range(size + int(p.get("total_delta", 0))))
            if body:
                self._send_file(entry, f, other.start, other.length)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class BlobServer:
    """The server in this process: HTTP on (host, port) and, optionally, the admin API on a
    Unix socket. `start()` returns once listening; `url` then has the real port."""

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                 admin_socket: str | os.PathLike | None = None, verbose: bool = False):
        self.root = Path(root)
        self.stats = Stats()
        self.faults = Faults()
        self.verbose = verbose
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._http = _HTTPServer((host, port), _Handler)
        self._http.app = self
        self._unix = None
        self.admin_socket = str(admin_socket) if admin_socket else None
        if self.admin_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.admin_socket)
            self._unix = _UnixServer(self.admin_socket, _Handler)
            self._unix.app = self

    @property
    def address(self) -> tuple[str, int]:
        return self._http.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def blob_url(self, digest: str, repo: str = DEFAULT_REPO) -> str:
        return blob_url(self.url, digest, repo)

    def start(self) -> BlobServer:
        if self._threads:
            raise RuntimeError("BlobServer already started")
        for srv in filter(None, (self._http, self._unix)):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                 name="blobserver")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.faults.clear()  # releases stalled handlers
        for srv in filter(None, (self._http, self._unix)):
            if self._threads:  # shutdown() waits for serve_forever(): only if it runs
                srv.shutdown()
            srv.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:  # idle keep-alive connections would otherwise linger for `timeout`
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        if self.admin_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.admin_socket)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def __enter__(self) -> BlobServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self) -> BlobServerClient:
        return BlobServerClient(admin_socket=self.admin_socket) if self.admin_socket else BlobServerClient(url=self.url)
