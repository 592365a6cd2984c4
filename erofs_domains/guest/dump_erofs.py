"""dump.erofs, run and parsed: the superblock summary (`-s`), an inode (`--nid`/`--path`),
a directory listing (`--ls`) and a file's content (`--cat`).  The parsers are pure (text in,
values out); `DumpErofs` runs the tool with `cmd()`, so a failure names the command and
shows its output."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from erofs_domains.base.proc import cmd


def parse_dump_superblock(text: str) -> dict[str, str]:
    """`dump.erofs -s` -> {"Filesystem UUID": "...", "Filesystem blocksize": "4096", ...}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.startswith("Filesystem"):
            out[key.strip()] = value.strip()
    return out


_DUMP_KINDS = {"regular file": "file", "directory": "dir", "symlink file": "symlink"}


def parse_dump_inode(text: str) -> dict:
    """`dump.erofs --nid=N` / `--path=P` -> {kind, mode, size, nid, links, xattr_size}."""
    info: dict = {}
    m = re.search(r"^Size:\s*(\d+)\s+On-disk size:\s*(\d+)\s+(.+?)\s*$", text, re.M)
    if m:
        info["size"] = int(m[1])
        info["kind"] = _DUMP_KINDS.get(m[3], m[3])
    m = re.search(r"NID:\s*(\d+)\s+Links:\s*(\d+)", text)
    if m:
        info["nid"], info["links"] = int(m[1]), int(m[2])
    m = re.search(r"Xattr size:\s*(\d+)", text)
    info["xattr_size"] = int(m[1]) if m else 0
    m = re.search(r"Access:\s*([0-7]+)/", text)
    if m:
        info["mode"] = int(m[1], 8)
    if "kind" not in info or "mode" not in info:
        raise ValueError(f"unrecognised dump.erofs inode output:\n{text}")
    return info


def parse_dump_ls(text: str) -> list[tuple[int, int, str]]:
    """`dump.erofs --ls` -> [(nid, file type, name)] (types: 1 reg, 2 dir, 7 symlink)."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            out.append((int(parts[0]), int(parts[1]), parts[2]))
    return out




class DumpErofs:
    """dump.erofs on one image, with its extra devices (`--device=`, in device-table order)."""

    def __init__(self, dump: str | os.PathLike, image: str | os.PathLike,
                 devices: Iterable[str | os.PathLike] = ()):
        self.argv = [str(dump), *[f"--device={d}" for d in devices]]
        self.image = str(image)

    def _run(self, *args: str, text: bool = True):
        return cmd([*self.argv, *args, self.image], text=text).stdout

    def superblock(self) -> dict[str, str]:
        return parse_dump_superblock(self._run("-s"))

    def inode(self, nid: int) -> dict:
        return parse_dump_inode(self._run(f"--nid={nid}"))

    def ls(self, nid: int) -> list[tuple[int, int, str]]:
        """The directory's entries without "." and ".."."""
        return [e for e in parse_dump_ls(self._run("--ls", f"--nid={nid}")) if e[2] not in (".", "..")]

    def cat(self, nid: int) -> bytes:
        return self._run("--cat", f"--nid={nid}", text=False)
