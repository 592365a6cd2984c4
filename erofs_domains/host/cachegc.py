"""Keep the cache root bounded: what each kind of entry is, when it was last used, and which
ones may go.

A kind keeps its `keep` most recently used entries, and every entry used in the last
`min_age` seconds (another run may be booting that kernel or building in that directory
right now). Everything here is rebuilt on demand when it is missing, so pruning costs time,
never correctness. `prune()` only lists directories and stats a few files per entry: the
controller runs it at every session start. Debian sources, apt downloads and the tox venvs
are listed but pruned only on request (`tools/cache --clear src`).
"""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Kind:
    name: str
    subdir: str
    what: str
    keep: int | None  # None: never pruned automatically
    min_age: float = DAY
    pattern: str = "*"  # "": the directory itself is the one entry
    # Files whose mtime/atime say "used": the newest of them and the entry itself counts.
    # (atime: the filesystems here mount relatime, which still moves atime once a day.)
    used_by: tuple[str, ...] = ()


KINDS = (
    Kind("launch", "launch", "guest launch scripts, one per boot", keep=50, min_age=HOUR, pattern="*.sh"),
    Kind("kernels", "kernels", "built kernel images, by content", keep=6, used_by=(".used", "bzImage")),
    Kind("kbuild", "kbuild", "kernel build directories, by (tree, fragments)", keep=4,
         used_by=(".config", "stored-image", "arch/x86/boot/bzImage")),
    Kind("images", "images", "erofs images, by (seed, layout, mkfs version)", keep=400,
         used_by=("image.json",)),
    Kind("probes", "probes", "features probe answers, by kernel", keep=20, pattern="*.json"),
    Kind("erofs-utils", "erofs-utils", "erofs-utils builds", keep=3, used_by=("build-info.json",)),
    Kind("src", "src", "unpacked kernel sources (Debian packages, copies)", keep=None),
    Kind("apt", "apt", "the private apt lists and downloads", keep=None),
    Kind("farms", "farms", "hard-link farms of a tree with a patch series applied (compare-kernels)", keep=None),
    Kind("bisect", "bisect", "tools/bisect's git worktrees, one per repository", keep=None),
    Kind("erofs-utils-trees", "erofs-utils-trees", "erofs-utils branches plugged into (unit tests)", keep=None),
    Kind("results", "results", "vm-run/vm-python results of older checkouts (now results/)", keep=None),
    Kind("tox-venv", "tox-venv", "the venv tools/tox runs tox from", keep=None, pattern=""),
)
# Files of the cache root itself that no kind lists.
ROOT_FILES = ("kvm-probe",)
BY_NAME = {k.name: k for k in KINDS}


def last_used(entry: Path, kind: Kind) -> float:
    """The newest mtime or atime among the entry and its `used_by` files."""
    times = []
    for p in (entry, *(entry / f for f in kind.used_by)):
        try:
            st = p.stat()
        except OSError:
            continue
        times.append(max(st.st_mtime, st.st_atime if p != entry else 0))
    return max(times, default=0.0)


def mark_used(path: Path) -> None:
    """Say that a cached kernel (the directory of a bzImage under kernels/) was used now."""
    d = Path(path).parent
    if d.parent.name == "kernels":
        try:
            (d / ".used").touch()
        except OSError:
            pass


def entries(root: Path, kind: Kind) -> list[tuple[Path, float]]:
    """(entry, last used), most recently used first. Hidden entries (in-progress builds,
    locks) are not listed."""
    d = root / kind.subdir
    if not d.is_dir():
        return []
    if not kind.pattern:
        return [(d, last_used(d, kind))]
    found = [(p, last_used(p, kind)) for p in d.glob(kind.pattern) if not p.name.startswith(".")]
    return sorted(found, key=lambda e: e[1], reverse=True)


def prunable(root: Path, kind: Kind, now: float | None = None) -> list[Path]:
    """Entries beyond the `keep` most recently used and not used for `min_age`."""
    if kind.keep is None:
        return []
    now = time.time() if now is None else now
    return [p for p, used in entries(root, kind)[kind.keep:] if now - used > kind.min_age]


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # Move aside first: a reader never sees half an entry under its real name.
        aside = path.with_name(f".pruned-{path.name}-{os.getpid()}")
        try:
            path.rename(aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune(root: Path, kinds=KINDS, now: float | None = None) -> dict[str, int]:
    """Remove what `prunable` names; returns how many entries of each kind went."""
    removed = {}
    for kind in kinds:
        gone = prunable(root, kind, now)
        for p in gone:
            remove(p)
        for stale in (root / kind.subdir).glob(".pruned-*") if kind.keep is not None else ():
            shutil.rmtree(stale, ignore_errors=True)  # an earlier prune that was interrupted
        if gone:
            removed[kind.name] = len(gone)
    return removed


def clear(root: Path, kinds) -> dict[str, int]:
    """Remove every entry of these kinds."""
    removed = {}
    for kind in kinds:
        found = entries(root, kind)
        for p, _ in found:
            remove(p)
        removed[kind.name] = len(found)
    return removed


def size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_blocks * 512
        except OSError:
            return 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def unknown(root: Path) -> list[str]:
    """What the cache root holds that no kind names: --list says so (it is never removed)."""
    known = {k.subdir for k in KINDS} | set(ROOT_FILES)
    try:
        return sorted(p.name for p in root.iterdir() if p.name not in known and not p.name.startswith("."))
    except OSError:
        return []


def table(root: Path, now: float | None = None) -> list[list]:
    """One row per kind: entries, size, what `prune` would remove, the policy."""
    rows = []
    for kind in KINDS:
        found = entries(root, kind)
        gone = set(prunable(root, kind, now))
        total = sum(size(p) for p, _ in found)
        freed = sum(size(p) for p in gone)
        policy = ("on request only" if kind.keep is None else
                  f"keep {kind.keep} newest + used in {kind.min_age / HOUR:.0f} h")
        rows.append([kind.name, len(found), human(total), f"{len(gone)} ({human(freed)})", policy, kind.what])
    return rows
