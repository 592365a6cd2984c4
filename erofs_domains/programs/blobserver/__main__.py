"""python -m erofs_domains.programs.blobserver --root DIR --listen ADDR:PORT [--admin-socket PATH]"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import erofs_domains.programs.blobserver
from erofs_domains.programs.blobserver.blobs import publish
from erofs_domains.programs.blobserver.server import BlobServer


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m erofs_domains.programs.blobserver",
                                description=erofs_domains.programs.blobserver.__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, type=Path, help="directory with blobs/sha256/<hex>")
    p.add_argument("--listen", default="127.0.0.1:0", type=_listen, metavar="ADDR:PORT",
                   help="HTTP address (port 0: any free port; default 127.0.0.1:0)")
    p.add_argument("--admin-socket", metavar="PATH", help="also serve /_admin/ on this Unix socket")
    p.add_argument("--publish", action="append", default=[], type=Path, metavar="FILE",
                   help="publish FILE under its digest before serving (repeatable; digests are printed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request on stderr")
    args = p.parse_args(argv)
    for path in args.publish:
        print(f"{publish(args.root, path)} {path}", file=sys.stderr)
    server = BlobServer(args.root, *args.listen, admin_socket=args.admin_socket, verbose=args.verbose)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"READY {server.url}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
