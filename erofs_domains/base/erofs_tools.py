"""The erofs-utils under test: mkfs.erofs (named once, by MKFS_EROFS) and dump.erofs /
fsck.erofs beside it, what they are (version string, content hash) and what they can do.

One probe for the whole suite: the features table, the image cache key, the erofs-utils
builder and the unit tests all ask this module, so they never disagree about which binary
runs.  The version string is only a label: erofs-utils bakes it in at autogen time, so a
rebuilt mkfs with a planted bug still says `1.9.3`; what identifies a binary is its content
hash (`identity()`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import NamedTuple

from erofs_domains.base import config
from erofs_domains.base.file_digest import sha256_file
from erofs_domains.base.proc import CmdError, cmd

ENV = {"mkfs": "MKFS_EROFS", "dump": "DUMP_EROFS", "fsck": "FSCK_EROFS"}
NAMES = {"mkfs": "mkfs.erofs", "dump": "dump.erofs", "fsck": "fsck.erofs"}

# What the suite uses of erofs-utils, by the first release that has it.  A test needing a newer
# tool skips naming the version (and fails in strict mode): `Tools.why_not(feature)`.
TOOL_FEATURES: dict[str, tuple[str, tuple[int, int, int]]] = {
    # dump/main.c: {"cat", no_argument, NULL, 7} arrived in 1.8.5
    "dump --cat": ("dump", (1, 8, 5)),
}
# Known bugs of the tools, with the first release that fixes them (None: every release the
# suite was run with has it, 1.8.6 and 1.9.4 the newest). The test of each xfails where the
# table says it is present and fails where it is not, so a fixed release is noticed.
KNOWN_TOOL_BUGS: dict[str, tuple[str, tuple[int, int, int] | None]] = {
    # fsck/main.c erofsfsck_dump_xattrs(): an xattr with an empty value ends the loop ("failed to
    # get xattr value size"), so it and the inode's xattrs listed after it are not extracted
    "empty xattr value": ("fsck", None),
    # erofs_extract_file(): holes are lseek()ed over and the file never extended to i_size, so a
    # chunked file ending in null chunks is extracted short
    "trailing hole": ("fsck", None),
}


def has_known_bug(bug: str, version: str | None) -> bool:
    """The table says this release of the tool has `bug`."""
    _, fixed = KNOWN_TOOL_BUGS[bug]
    v = version_tuple(version)
    return fixed is None or (v is not None and v < fixed)


# Releases the suite does not support, [first, fixed) with the reason: every test that needs
# images skips naming it (fails in strict mode).  Supported: 1.8.x and 1.9.1 and newer.
UNSUPPORTED: list[tuple[tuple[int, int, int], tuple[int, int, int], str]] = [
    ((0, 0, 0), (1, 8, 0), "older than 1.8, the oldest release the suite was run with"),
    # erofs_mkfs_rebuild_load_trees(): the source images' sbi had no xattr manager, so
    # get_xattritem() dereferenced NULL for the first xattr of a layer (mkfs.erofs SIGSEGV)
    ((1, 9, 0), (1, 9, 1), "its mkfs.erofs crashes merging layers that have xattrs (rebuild mode; "
                           "fixed in 1.9.1 by commit 2ce4b18)"),
]


def version(tool: str | os.PathLike | None) -> str | None:
    """`<tool> --version` -> "1.9.3" (a git build adds -<n>-g<commit>[-dirty]); None when it
    does not run.  Every erofs-utils tool prints `<name> (erofs-utils) <version>`."""
    if not tool:
        return None
    try:
        r = cmd([tool, "--version"], timeout=30, check=False)  # exit status judged below
    except CmdError:  # does not start, or hangs
        return None
    out = (r.stdout + r.stderr).strip()
    m = re.search(r"\(erofs-utils\)\s+(\S+)", out)
    if m:
        return m.group(1)
    return out.splitlines()[0].split()[-1] if r.returncode == 0 and out else None


def version_tuple(v: str | None) -> tuple[int, int, int] | None:
    """"1.8.5-119-g2ca608f" -> (1, 8, 5); "1.9" -> (1, 9, 0); None if it is not a release number."""
    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", v or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, ino: int) -> str:
    return sha256_file(path)


def digest(path: str | os.PathLike) -> str:
    """sha256 of the file's content (cached per path, size, mtime and inode)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _digest(real, st.st_size, st.st_mtime_ns, st.st_ino)


_SCRIPT_WORD = re.compile(rb"[\w./+-]+")


def identity(mkfs: str | os.PathLike) -> str:
    """What the images built by `mkfs` depend on: the content hash of the binary.  For a
    script (a wrapper), the hash also covers every file it names by path (absolute, or
    relative to the script's directory), so a wrapper around a rebuilt binary is a new mkfs
    too.  A wrapper that finds its binary through $PATH is identified by its own text only."""
    real = Path(os.path.realpath(mkfs))
    h = hashlib.sha256(digest(real).encode())
    head = real.read_bytes()[:65536]
    if head.startswith(b"#!"):
        for word in sorted(set(_SCRIPT_WORD.findall(head))):
            try:
                name = os.fsdecode(word)
                p = Path(name) if name.startswith("/") else real.parent / name
                if "/" in name and p.is_file() and p.resolve() != real:
                    h.update(name.encode() + b"\0" + digest(p).encode())
            except (OSError, ValueError):
                continue
    return h.hexdigest()


def sibling(mkfs: str | os.PathLike, kind: str, *, env: bool = True) -> str | None:
    """dump.erofs or fsck.erofs for this mkfs: $DUMP_EROFS/$FSCK_EROFS if set (and `env`), else
    beside it (same directory, or erofs-utils' build layout: mkfs/mkfs.erofs -> ../dump/dump.erofs)."""
    if env and (named := getattr(config.current(), kind)):
        return named
    here = Path(os.path.abspath(mkfs)).parent
    for cand in (here / NAMES[kind], here.parent / kind / NAMES[kind]):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


class Tools(NamedTuple):
    """The three tools under test (dump/fsck None when not found beside mkfs)."""

    mkfs: str
    dump: str | None
    fsck: str | None

    @classmethod
    def beside(cls, mkfs: str | os.PathLike, *, env: bool = True) -> Tools:
        """`env=False`: ignore $DUMP_EROFS/$FSCK_EROFS (they belong to $MKFS_EROFS, and this
        mkfs was named otherwise)."""
        mkfs = os.path.abspath(mkfs)
        return cls(mkfs, sibling(mkfs, "dump", env=env), sibling(mkfs, "fsck", env=env))

    @classmethod
    def from_env(cls) -> Tools | None:
        mkfs = config.current().mkfs
        return cls.beside(mkfs) if mkfs else None

    def env(self) -> dict[str, str]:
        return {ENV[k]: v for k, v in self._asdict().items() if v}

    def version(self, kind: str = "mkfs") -> str | None:
        return version(getattr(self, kind))

    def why_not(self, feature: str) -> str | None:
        """None if the tool has `feature` (a TOOL_FEATURES key), else why not, naming the
        release that brought it."""
        kind, need = TOOL_FEATURES[feature]
        path = getattr(self, kind)
        if not path:
            return f"no {NAMES[kind]} beside {self.mkfs} (set {ENV[kind]})"
        have = version(path)
        got = version_tuple(have)
        if got is None or got < need:
            return (f"`{NAMES[kind]} {feature.split(' ', 1)[1]}` needs erofs-utils "
                    f"{'.'.join(map(str, need))} or newer; {path} is {have or 'of unknown version'}")
        return None

    def why_unsupported(self) -> str | None:
        """None if the suite supports this erofs-utils (UNSUPPORTED), else why not."""
        have = version(self.mkfs)
        got = version_tuple(have)
        if got is None:
            return None  # a wrapper or a build without a release number: take it as it is
        for first, fixed, why in UNSUPPORTED:
            if first <= got < fixed:
                return f"erofs-utils {have} ({self.mkfs}) is not supported: {why}"
        return None

    def describe(self) -> str:
        """`1.9.3 /path/mkfs.erofs sha256:0123abcd4567` for the features table and reports."""
        try:
            h = f"sha256:{digest(self.mkfs)[:12]}"
        except OSError as e:
            h = f"unreadable ({e.strerror})"
        return f"{version(self.mkfs) or 'does not run'} {self.mkfs} {h}"
