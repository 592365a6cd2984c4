"""What a tree holds (`Manifest`: path -> `Entry`), and how a tree read back differs from it
(`Mismatch`es: facts, not a bool, so an assertion can print them).

A manifest is made by scanning a directory (`from_tree`: a generated tree, an extracted
image, a mountpoint), by dump.erofs alone (`from_dump`, a cross-check that goes through
neither fsck.erofs nor the kernel), or by merging layers as mkfs.erofs' rebuild mode does
(`overlay`).  `Manifest.verify(mountpoint)` reads everything under it and compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base.file_digest import sha256_file
from erofs_domains.guest import dump_erofs

# mkfs.erofs' rebuild mode makes a fresh root directory (erofs_make_empty_root_inode(),
# lib/inode.c: S_IFDIR | 0777); the layers' root attributes are not merged.
REBUILD_ROOT_MODE = 0o777

@dataclass
class Entry:
    """What one path of a tree is.  None means "not known" and is not compared."""

    kind: str  # "dir" | "file" | "symlink"
    mode: int | None  # permission bits incl. suid/sgid/sticky (stat.S_IMODE)
    size: int | None = None  # files: bytes; symlinks: len(target); dirs: None
    sha256: str | None = None  # files only
    target: str | None = None  # symlinks only
    xattrs: dict[str, str] | None = None  # name -> hex value (user.* only); None: unknown
    link: str | None = None  # hard links: smallest path of the group of paths sharing the inode

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        return cls(**data)


@dataclass(frozen=True)
class Mismatch:
    path: str
    field: str  # missing | unexpected | error | kind | mode | size | sha256 | target | xattrs | link
    expected: object
    actual: object

    def __str__(self) -> str:
        exp, act = self.expected, self.actual
        if self.field == "mode":
            exp = oct(exp) if isinstance(exp, int) else exp
            act = oct(act) if isinstance(act, int) else act
        return f"{self.path}: {self.field}: expected {exp!r}, got {act!r}"


_COMPARED = ("kind", "mode", "size", "sha256", "target", "xattrs", "link")



def _regroup_links(entries: dict[str, Entry], group_of: dict[str, object]) -> None:
    """Set `link` of every path in a group of >= 2 paths to the group's smallest path."""
    groups: dict[object, list[str]] = {}
    for path, key in group_of.items():
        if path in entries:
            groups.setdefault(key, []).append(path)
    for paths in groups.values():
        first = min(paths) if len(paths) > 1 else None
        for p in paths:
            entries[p].link = first


@dataclass
class Manifest:
    """path ("/", "/dir/file") -> Entry, plus read errors met while scanning a tree."""

    entries: dict[str, Entry] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entries))

    def __getitem__(self, path: str) -> Entry:
        return self.entries[path]

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def files(self) -> list[str]:
        return [p for p in self if self.entries[p].kind == "file"]

    @property
    def total_size(self) -> int:
        seen, total = set(), 0
        for p, e in self.entries.items():
            if e.kind == "file" and (e.link or p) not in seen:
                seen.add(e.link or p)
                total += e.size or 0
        return total

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    # -- construction ---------------------------------------------------------

    @classmethod
    def from_tree(cls, root: str | os.PathLike, *, xattr_prefixes: tuple[str, ...] = ("user.",)) -> Manifest:
        """Scan a directory (a source tree, an extracted image or a mountpoint).  Reading
        every file is the point on a mountpoint; read errors go to `errors`."""
        root = Path(root)
        m = cls()
        inodes: dict[str, tuple[int, int]] = {}

        def rel(path: Path) -> str:
            return "/" + path.relative_to(root).as_posix() if path != root else "/"

        def error(path: Path, e: OSError) -> None:
            m.errors[rel(path)] = f"{type(e).__name__}: {e.strerror or e} (errno {e.errno})"

        def scan(path: Path) -> None:
            try:
                st = path.lstat()
                entry = cls._entry(path, st, xattr_prefixes)
            except OSError as e:
                error(path, e)
                return
            m.entries[rel(path)] = entry
            if entry.kind == "file":
                inodes[rel(path)] = (st.st_dev, st.st_ino)

        scan(root)
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: error(Path(e.filename or root), e)):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                scan(Path(dirpath, name))
        _regroup_links(m.entries, inodes)
        return m

    @staticmethod
    def _entry(full: Path, st: os.stat_result, xattr_prefixes: tuple[str, ...]) -> Entry:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            return Entry("symlink", mode, len(os.fsencode(target)), target=target)
        xattrs = {
            name: os.getxattr(full, name, follow_symlinks=False).hex()
            for name in sorted(os.listxattr(full, follow_symlinks=False))
            if name.startswith(xattr_prefixes)
        }
        if stat.S_ISDIR(st.st_mode):
            return Entry("dir", mode, xattrs=xattrs)
        if stat.S_ISREG(st.st_mode):
            return Entry("file", mode, st.st_size, sha256_file(full), xattrs=xattrs)
        return Entry(f"special:{stat.S_IFMT(st.st_mode):o}", mode, xattrs=xattrs)

    @classmethod
    def from_dump(cls, dump: str, image: str | os.PathLike, devices: Iterable[str | os.PathLike] = ()) -> Manifest:
        """Build a manifest with dump.erofs alone (`--ls`, `--nid`, `--cat`), as a cross-check
        that does not go through fsck.erofs or the kernel.  dump.erofs shows only the size of
        the xattrs, so `xattrs` is None (unknown) except that an inode without xattrs gets {};
        and it prints `i_mode & 0777` (no suid/sgid/sticky): compare with `mode_mask=0o777`.
        About 2 dump.erofs runs per inode (run in parallel): meant for small trees."""
        run = dump_erofs.DumpErofs(dump, image, devices)
        nids = {"/": int(run.superblock()["Filesystem root nid"])}
        with ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 1))) as pool:  # one process per call
            dirs = ["/"]
            while dirs:  # breadth first, a level at a time
                below = []
                for parent, listing in zip(dirs, pool.map(run.ls, [nids[d] for d in dirs])):
                    for nid, ftype, name in listing:
                        path = f"{parent.rstrip('/')}/{name}"
                        nids[path] = nid
                        if ftype == 2:  # EROFS_FT_DIR
                            below.append(path)
                dirs = below
            unique = sorted(set(nids.values()))
            infos = dict(zip(unique, pool.map(run.inode, unique)))
            readable = [n for n in unique if infos[n]["kind"] in ("file", "symlink")]
            contents = dict(zip(readable, pool.map(run.cat, readable)))
        m = cls()
        for path in sorted(nids):
            nid = nids[path]
            i = infos[nid]
            entry = Entry(i["kind"], i["mode"], xattrs=None if i["xattr_size"] else {})
            if i["kind"] == "file":
                entry.size, entry.sha256 = i["size"], hashlib.sha256(contents[nid]).hexdigest()
            elif i["kind"] == "symlink":
                entry.size, entry.target = i["size"], os.fsdecode(contents[nid])
            m.entries[path] = entry
        _regroup_links(m.entries, {p: n for p, n in nids.items() if m.entries[p].kind == "file"})
        return m

    @classmethod
    def overlay(cls, layers: Iterable[Manifest], *, root_mode: int | None = REBUILD_ROOT_MODE) -> Manifest:
        """The merged view of layers (bottom first) as mkfs.erofs' rebuild mode makes it:
        an upper entry hides a lower one at the same path (directories: the upper one's
        attributes and xattrs win, their children merge); below a non-directory nothing
        from lower layers shows."""
        layers = list(layers)
        out: dict[str, Entry] = {}
        groups: dict[str, object] = {}
        for idx in range(len(layers) - 1, -1, -1):
            layer = layers[idx]
            for path in layer:
                if path in out or _hidden_below_non_dir(out, path):
                    continue
                e = layer.entries[path]
                out[path] = Entry(**{**e.__dict__, "xattrs": dict(e.xattrs) if e.xattrs is not None else None})
                if e.kind == "file":
                    groups[path] = (idx, e.link or path)
        if "/" in out and root_mode is not None:
            out["/"].mode = root_mode
            out["/"].xattrs = {}
        _regroup_links(out, groups)
        return cls(dict(sorted(out.items())))

    # -- comparison -------------------------------------------------------------

    def compare(self, actual: Manifest, *, mode_mask: int = 0o7777) -> list[Mismatch]:
        """Mismatches of `actual` against this (expected) manifest; [] when they agree.
        Fields that are None on either side are not compared; modes are compared under
        `mode_mask`."""
        out = [Mismatch(p, "error", None, err) for p, err in sorted(actual.errors.items())]
        for path in sorted(set(self.entries) | set(actual.entries)):
            exp, act = self.entries.get(path), actual.entries.get(path)
            if act is None:
                if path not in actual.errors:
                    out.append(Mismatch(path, "missing", exp.kind, None))
                continue
            if exp is None:
                out.append(Mismatch(path, "unexpected", None, act.kind))
                continue
            for name in _COMPARED:
                a, b = getattr(exp, name), getattr(act, name)
                if name == "mode" and a is not None and b is not None:
                    a, b = a & mode_mask, b & mode_mask
                if (name == "link" or (a is not None and b is not None)) and a != b:
                    out.append(Mismatch(path, name, a, b))
                if name == "kind" and a != b:
                    break
        return out

    def verify(self, root: str | os.PathLike) -> list[Mismatch]:
        """Read everything under `root` (a mountpoint, an extracted image) and compare."""
        return self.compare(Manifest.from_tree(root))

    # -- serialisation -----------------------------------------------------------

    def to_json(self) -> dict:
        return {p: self.entries[p].to_json() for p in self}

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return cls({p: Entry.from_json(e) for p, e in data.items()})


def _hidden_below_non_dir(out: dict[str, Entry], path: str) -> bool:
    parent = path
    while parent not in ("/", ""):
        parent = parent.rsplit("/", 1)[0] or "/"
        e = out.get(parent)
        if e is not None and e.kind != "dir":
            return True
    return False
