"""The kernels a comparison or a bisect tests, built so that close variants share work.

A side is one of
  a bzImage                      used as it is
  a kernel tree                  built out of tree, incrementally (erofs_domains/host/kernel_build.py)
  TREE+PATCHES[+PATCHES...]      the tree plus a series: an mbox as `b4 am` writes it, a
                                 `git format-patch` file, or a directory of them (applied in
                                 name order)
  PATCHES                        (B only) A's tree plus this series
  6.1 | 6.12 | 7.2 | default     Debian's tree of that series (tools/build-kernel --kernel-version)

A series is never applied to the user's tree: it goes into a *farm* of the base tree, a
directory of hard links to its files (cache/farms/<hash of the tree path>/tree), where every
file a series touches is first replaced by a private copy.  One farm per base tree is reused
by every series on it, and its build directory starts as a copy of the base tree's own
(kbuild records the source path in its .cmd files: they are rewritten), so a series that
touches a few files rebuilds those files and links.  Files an earlier series touched get a
private copy with a new mtime, so they are rebuilt back as well.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.proc import CmdError, cmd
from erofs_domains.host import deps, validate
from erofs_domains.host import kernel_build as kernel

VERSIONS = tuple(kernel.KERNELS)


@dataclass
class Side:
    """What one side of a comparison is, before it is built."""

    label: str
    image: Path | None = None
    tree: Path | None = None
    version: str | None = None  # Debian's tree of this series
    patches: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        version = self.version or kernel.DEFAULT_KERNEL_VERSION
        base = str(self.image or self.tree or f"Debian's linux-source-{version}")
        return base + "".join(f" + {p.name}" for p in self.patches)


def is_series(path: Path) -> bool:
    """An mbox or patch file, or a directory holding *.patch / *.mbx / *.eml files."""
    if path.is_dir():
        return bool(series_files(path)) and not kernel.is_kernel_tree(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(65536)
    text = b"\n" + head  # a unified diff may start on its first line
    return b"\n--- a/" in text or head.startswith(b"From ") or b"\ndiff --git " in text


def series_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".patch", ".mbx", ".eml", ".diff"))


def parse_side(spec: str, other: Side | None = None, label: str = "A") -> Side:
    """A command-line side (see the module docstring); B may name only a series (on A's base)."""
    if spec in VERSIONS or spec == "default":
        return Side(label, version=None if spec == "default" else spec)
    whole = Path(spec).expanduser()
    parts = [whole] if whole.exists() else [Path(p).expanduser() for p in spec.split("+")]
    head, rest = parts[0], parts[1:]
    for p in rest:
        if not is_series(p):
            raise deps.ToolError(f"{label}: {p} is not a patch series (an mbox, a patch file or a "
                                 f"directory of *.patch files)")
    if str(head) in VERSIONS or str(head) == "default":
        return Side(label, version=None if str(head) == "default" else str(head), patches=rest)
    if not head.exists():
        raise deps.ToolError(f"{label}: {head} does not exist (give a bzImage, a kernel tree, "
                             f"TREE+SERIES, a series for B, or one of {', '.join(VERSIONS)})")
    if head.is_file() and not is_series(head):
        if rest:
            raise deps.ToolError(f"{label}: a bzImage ({head}) cannot take patches")
        return Side(label, image=validate.check_bzimage(head, f"{label}:"))
    if kernel.is_kernel_tree(head):
        return Side(label, tree=head.resolve(), patches=rest)
    if is_series(head):
        if other is None or other.image is not None:
            raise deps.ToolError(f"{label}: {head} is a patch series; it needs a tree to apply to "
                                 f"(give TREE+{head}, or give A as a tree)")
        return Side(label, tree=other.tree, version=other.version, patches=other.patches + parts)
    raise deps.ToolError(f"{label}: {head} is neither a bzImage nor a kernel tree nor a patch series")


# ----------------------------------------------------------------- patches
_DIFF_PATH = re.compile(r"^diff --git a/(\S+) b/(\S+)$|^\+\+\+ b/(\S+)|^--- a/(\S+)", re.M)


def touched_paths(patch_text: str) -> list[str]:
    """Paths a patch (or an mbox of patches) reads or writes, relative to the tree (-p1)."""
    out = []
    for m in _DIFF_PATH.finditer(patch_text):
        for g in m.groups():
            if g and g != "/dev/null" and g not in out:
                out.append(g)
    return out


def split_mbox(text: str) -> list[str]:
    """An mbox of several patches (`b4 am` output) -> one text per message."""
    parts = re.split(r"(?m)^(?=From [0-9a-f]{7,40} |From \S+@\S+ )", text)
    return [p for p in parts if p.strip()] or [text]


def apply_series(tree: Path, patches: list[Path]) -> None:
    """Apply each patch in order with `git apply` (works in a directory that is not a repository)."""
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    for path in patches:
        for i, text in enumerate(split_mbox(path.read_text(errors="surrogateescape"))):
            try:
                cmd(["git", "apply", "--whitespace=nowarn", "-p1", "-"], cwd=tree, env=env,
                    input=text.encode(errors="surrogateescape"), text=False)
            except CmdError as e:
                subject = re.search(r"(?m)^Subject: (.*)$", text)
                raise deps.ToolError(
                    f"{path} (message {i + 1}{': ' + subject.group(1) if subject else ''}) does not apply "
                    f"to {tree}: {e}") from e


# ----------------------------------------------------------------- farms
@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def private_copy(src: Path | None, dst: Path) -> None:
    """Replace `dst` by a file of its own (a copy of `src`, or removed when src is None), with
    a new mtime: whatever was built from an earlier content of `dst` is rebuilt."""
    if src is None or not src.exists():
        dst.unlink(missing_ok=True)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".farm-tmp")
    shutil.copyfile(src, tmp)
    shutil.copymode(src, tmp)
    tmp.replace(dst)


def series_digest(patches: list[Path]) -> str:
    h = hashlib.sha256()
    for p in patches:
        for f in series_files(p):
            h.update(f.read_bytes())
    return h.hexdigest()


def sync_farm(base: Path, farm: Path, private: set[str]) -> int:
    """Make `farm` hard links of `base` (except .git and the `private` paths); returns how many
    links were made or replaced."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != ".git"]
            rel = ""
        out = farm / rel
        out.mkdir(exist_ok=True)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            r = os.path.join(rel, name)
            if r in private:
                continue
            src = os.path.join(dirpath, name)
            dst = out / name
            s = os.lstat(src)
            try:
                if os.lstat(dst).st_ino == s.st_ino:
                    continue
                dst.unlink()
            except FileNotFoundError:
                pass
            os.link(src, dst, follow_symlinks=False)
            n += 1
    return n


def same_file(a: Path, b: Path) -> bool:
    """Same content (a hard link of the other, or equal bytes)."""
    try:
        sa, sb = a.lstat(), b.lstat()
    except FileNotFoundError:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if sa.st_size != sb.st_size or os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    import filecmp

    return filecmp.cmp(a, b, shallow=False)


def builddir_for(src: Path, options: dict[str, str]) -> Path:
    return kernel.KernelBuild(src=src, options=options).builddir


def seed_builddir(src_build: Path, dst_build: Path, old_src: Path, new_src: Path) -> bool:
    """Start `dst_build` as a copy of `src_build`, the source path in its make files rewritten
    (kbuild compares saved command lines, which hold -I<srctree>/...)."""
    if dst_build.exists() or not (src_build / ".config").exists() or not (src_build / "vmlinux").exists():
        return False
    tmp = dst_build.with_name(dst_build.name + ".seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd(["cp", "-a", src_build, tmp])
    old, new = str(old_src).encode(), str(new_src).encode()
    for dirpath, _, filenames in os.walk(tmp):
        for name in filenames:
            if not (name.endswith((".cmd", ".d")) or name == "Makefile"):
                continue
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                data = f.read()
            if old in data:
                st = os.stat(p)
                with open(p, "wb") as f:
                    f.write(data.replace(old, new))
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp / "source").unlink(missing_ok=True)
    (tmp / "stored-image").unlink(missing_ok=True)
    tmp.rename(dst_build)
    return True


def settle_tools(build, seed_build: Path, touched: list[str], log) -> None:
    """After seeding: build objtool now and give it the seed's mtime.  Every object names
    objtool as a prerequisite (`$(wildcard ./tools/objtool/objtool)` in its .cmd), and the
    tools build relinks it in a relocated build directory (it is built with -g, the source
    path is in it), which would rebuild every object.  Its sources are the seed's unless the
    series touches tools/, so the old mtime is the truth."""
    objtool = build.builddir / "tools" / "objtool" / "objtool"
    old = seed_build / "tools" / "objtool" / "objtool"
    if not old.exists() or any(p.startswith("tools/") for p in touched):
        return
    start = time.monotonic()
    build._make("tools/objtool")
    if not objtool.exists():
        return
    # objtool and everything it is linked from (libsubcmd.a, objtool-in.o ...), or the next
    # make finds its inputs newer and links it again.
    n = 0
    for dirpath, _, filenames in os.walk(build.builddir / "tools"):
        for name in filenames:
            new_f = Path(dirpath) / name
            seed_f = seed_build / new_f.relative_to(build.builddir)
            if seed_f.exists() and not new_f.is_symlink():
                st = seed_f.stat()
                os.utime(new_f, ns=(st.st_atime_ns, st.st_mtime_ns))
                n += 1
    log(f"objtool rebuilt in {time.monotonic() - start:.0f} s; {n} files under tools/ keep the seed's mtimes")


@dataclass
class Farm:
    """A base tree's farm: its tree, state (paths that are private copies) and lock."""

    base: Path
    seeded_from: Path | None = None
    touched: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return cache_root() / "farms" / hashlib.sha256(str(self.base.resolve()).encode()).hexdigest()[:12]

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    def prepare(self, patches: list[Path], options: dict[str, str], log) -> Path:
        """The farm tree holding base + patches, its build directory seeded; call under lock()."""
        state_file = self.root / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {"dirty": []}
        dirty = set(state["dirty"])
        start = time.monotonic()
        self.tree.mkdir(parents=True, exist_ok=True)
        n = sync_farm(self.base, self.tree, dirty)
        touched = []
        for p in patches:
            for f in series_files(p):
                touched += touched_paths(f.read_text(errors="surrogateescape"))
        self.touched = touched
        if n == 0 and state.get("built") == series_digest(patches) and \
                (builddir_for(self.tree, options) / "vmlinux").exists():
            log(f"farm {self.tree}: already holds this series, built")
            self.seeded_from = None
            return self.tree
        # Everything an earlier series touched, and what this one touches, becomes a private
        # copy of the base (new mtime): rebuilt now, and again when the next series drops it.
        for rel in sorted(dirty | set(touched)):
            private_copy(self.base / rel, self.tree / rel)
        state_file.write_text(json.dumps({"dirty": sorted(dirty | set(touched))}))
        apply_series(self.tree, [f for p in patches for f in series_files(p)])
        log(f"farm {self.tree}: {n} links refreshed, {len(dirty | set(touched))} private files, "
            f"{len(patches)} series applied in {time.monotonic() - start:.1f} s")
        seed = builddir_for(self.base, options)
        self.seeded_from = None
        if seed_builddir(seed, builddir_for(self.tree, options), self.base, self.tree):
            log(f"build directory of the farm seeded from {seed}")
            self.seeded_from = seed
        self.touched = touched
        return self.tree

    def built(self, patches: list[Path]) -> None:
        """After a successful build: only this series' files stay private."""
        touched = sorted({t for p in patches for f in series_files(p)
                          for t in touched_paths(f.read_text(errors="surrogateescape"))})
        (self.root / "state.json").write_text(json.dumps({"dirty": touched, "built": series_digest(patches)}))


# ----------------------------------------------------------------- building
@functools.cache
def debian_tree(version: str | None) -> Path:
    """Debian's unpacked tree of a kernel series, resolved once per run (the private apt
    list's update and download check took 52 s here even with everything cached)."""
    series = kernel.choose_series(version, None)
    return kernel.fetch_debian_source(series.package, series.suites, log=kernel.KernelBuild.log)


def base_build(side: Side, profile: str = "default"):
    """(tree, KernelBuild) of a side's base: its tree, or Debian's tree of its series."""
    tree = side.tree or debian_tree(side.version)
    b = kernel.build_for(kernel.choose_series(side.version, tree), tree, profile)  # the series' fragments
    b.pristine = side.tree is None  # an unpacked Debian package: its stamp is trusted
    return tree, b


def build_side(side: Side, profile: str = "default", log=kernel.KernelBuild.log) -> tuple[Path, float]:
    """The bzImage of a side and the seconds its build took."""
    start = time.monotonic()
    if side.image is not None:
        return side.image, 0.0
    tree, base = base_build(side, profile)
    if not side.patches:
        return base.build(), time.monotonic() - start
    farm = Farm(tree)
    with locked(farm.root / "lock"):
        src = farm.prepare(side.patches, base.options, log)
        b = kernel.KernelBuild(src=src, options=base.options, profile=profile)
        if farm.seeded_from is not None:
            settle_tools(b, farm.seeded_from, farm.touched, log)
        image = b.build()
        farm.built(side.patches)
    return image, time.monotonic() - start
