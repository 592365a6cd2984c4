"""Command line for the on-demand daemon: ``python -m erofs_domains.programs.ondemand`` or
``tools/ondemand-daemon``.

Prints ``READY <pid>`` once bound (or restored) and ``ERROR <errno> <message>``
(exit status 1) if binding fails; diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys

from .daemon import DEFAULT_FETCH, DEFAULT_FETCH_TIMEOUT, DEFAULT_FILL, DEVICE, OnDemandDaemon

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``1M``, ``1G`` -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = _SUFFIXES.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(t, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _size_pair(text: str) -> tuple[str, int]:
    name, value = _pair(text)
    try:
        return name, int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line on stderr (the usage is behind --help), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ondemand-daemon",
        description="cachefiles on-demand daemon serving EROFS blobs for the fscache tests.")
    p.add_argument("--cache", required=True, metavar="DIR",
                   help="cache directory for the 'dir' command (must not be tmpfs)")
    p.add_argument("--tag", help="cache tag (default: the kernel's 'CacheFiles')")
    p.add_argument("--blobs", metavar="DIR", help="directory of blobs; file name = cookie name")
    p.add_argument("--blob", action="append", type=_pair, default=[], metavar="NAME=PATH",
                   help="serve cookie NAME from PATH (repeatable)")
    p.add_argument("--http-blob", action="append", type=_pair, default=[], metavar="NAME=URL",
                   help="serve cookie NAME from an HTTP URL: HEAD at OPEN, range GETs at READ (repeatable)")
    p.add_argument("--size-override", action="append", type=_size_pair, default=[],
                   metavar="NAME=SIZE", help="copen SIZE for NAME instead of its file size")
    p.add_argument("--log", metavar="FILE", help="JSON Lines request log")
    p.add_argument("--control", metavar="SOCK", help="Unix socket for the JSON control channel")
    p.add_argument("--fill-granularity", type=parse_size, default=DEFAULT_FILL, metavar="BYTES",
                   help="fill READs up to this aligned boundary (default 1M; 4096 = exact)")
    p.add_argument("--fetch-granularity", type=parse_size, default=DEFAULT_FETCH, metavar="BYTES",
                   help="HTTP blobs: fetch READs rounded up to this boundary (default 64K)")
    p.add_argument("--fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT, metavar="SECONDS",
                   help=f"HTTP blobs: limit for one request (default {DEFAULT_FETCH_TIMEOUT:g}); "
                        "a failed fetch completes its READ without data (EIO)")
    p.add_argument("--threads", type=int, default=4, help="READ worker threads (default 4)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="after a READ of a local blob, fill the next N fill granules in the "
                        "background (default 0: fill only what READs ask, rounded to the granularity)")
    p.add_argument("--adopt-socket", metavar="PATH",
                   help="take the device fd from the holder at PATH and write 'restore'")
    p.add_argument("--hold-socket", metavar="PATH",
                   help="after binding, hand a copy of the device fd to the holder at PATH")
    p.add_argument("--device", default=DEVICE, help=f"device node (default {DEVICE})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.cache):  # before the device is opened: the kernel's "dir" would say less
        code = errno.ENOENT if not os.path.exists(args.cache) else errno.ENOTDIR
        print(f"ERROR {code} --cache {args.cache} is not a directory; give the cache directory "
              "(an existing one, not on tmpfs)", flush=True)
        return 1
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="ondemand-daemon %(levelname)s %(message)s")
    try:
        daemon = OnDemandDaemon(
            args.cache, tag=args.tag, blobs_dir=args.blobs, blobs=dict(args.blob),
            size_override=dict(args.size_override), log_path=args.log,
            control_path=args.control, fill_granularity=args.fill_granularity,
            threads=args.threads, prefetch=args.prefetch, http_blobs=dict(args.http_blob),
            fetch_granularity=args.fetch_granularity, fetch_timeout=args.fetch_timeout,
            adopt_socket=args.adopt_socket,
            hold_socket=args.hold_socket, device=args.device)
    except ValueError as exc:
        print(f"ERROR 22 {exc}", flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    return daemon.run(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
