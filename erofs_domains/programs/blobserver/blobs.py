"""The blob store on disk: `ROOT/blobs/sha256/<hex>` (the OCI image-layout), `publish()` to
put a file there under its digest, and the registry URL of a blob."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from erofs_domains.base.file_digest import sha256_file

DEFAULT_REPO = "erofs/test"


def blob_path(root: str | os.PathLike, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return Path(root) / "blobs" / "sha256" / hexd


def sha256_digest(path: str | os.PathLike) -> str:
    """"sha256:<hex>" of the file's content."""
    return "sha256:" + sha256_file(path)


def publish(root: str | os.PathLike, path: str | os.PathLike, digest: str | None = None) -> str:
    """Make `path` servable from `root` under its digest (hard link, else symbolic link, so
    nothing is copied); returns "sha256:<hex>". Pass `digest` if it is known already
    (hashing large blobs is slow in a TCG guest); it is trusted."""
    digest = digest or sha256_digest(path)
    dest = blob_path(root, digest)
    if dest.exists():
        return digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        os.link(path, tmp)
    except OSError:
        os.symlink(os.path.abspath(path), tmp)
    os.replace(tmp, dest)
    return digest


def blob_url(base_url: str, digest: str, repo: str = DEFAULT_REPO) -> str:
    if not digest.startswith("sha256:"):
        digest = "sha256:" + digest
    return f"{base_url.rstrip('/')}/v2/{repo}/blobs/{digest}"

