"""Seeded content trees: `ContentTree.generate()` writes a deterministic tree whose every
byte, name, mode, xattr and link is a function of (seed, profile, layer name), with the
cases an image builder can get wrong (sizes around block and inline boundaries, sparse
files, hard links across directories, xattrs shared and not, long names and symlinks,
empty files and directories, deep nesting), and records its `Manifest`."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.guest.manifest import Manifest

BLOCK_SIZE = 4096  # the images' block size (mkfs.erofs -b); file sizes avoid its multiples
FIXED_MTIME = 1_600_000_000  # every entry of a generated tree


class XattrsUnsupported(OSError):
    pass


@dataclass(frozen=True)
class Profile:
    large_files: int
    large_size: int
    small_files: int
    many_files: int  # files in one directory (multi-block directory when large)
    sparse_files: int
    sparse_size: int
    depth: int  # nesting of deep/d1/d2/...


PROFILES = {
    "tiny": Profile(large_files=1, large_size=300_000, small_files=10, many_files=40, sparse_files=1,
                    sparse_size=1 << 20, depth=4),
    "small": Profile(large_files=2, large_size=3 << 20, small_files=24, many_files=400, sparse_files=2,
                     sparse_size=4 << 20, depth=8),
    "large": Profile(large_files=4, large_size=24 << 20, small_files=64, many_files=3000, sparse_files=4,
                     sparse_size=64 << 20, depth=16),
}  # fmt: skip

# sizes around block and inline boundaries
_SMALL_SIZES = [1, 17, 100, 1000, 2047, 2048, 3000, 4095, 4096, 4097, 6000, 8191, 8192, 8193, 12288, 65536]
_WORDS = b"erofs fscache cookie volume domain blob chunk cache daemon ondemand read copen cread".split()


def _rng(*parts: object) -> random.Random:
    return random.Random(hashlib.sha256("\0".join(map(str, parts)).encode()).digest())


def _data(rng: random.Random, size: int, compressible: bool) -> bytes:
    if not compressible:
        return rng.randbytes(size)
    chunk = b" ".join(rng.choice(_WORDS) for _ in range(1500)) + b"\n"
    out = bytearray((chunk * (size // len(chunk) + 1))[:size])
    for _ in range(size // 4096):  # a little noise so that every block differs
        i = rng.randrange(size)
        out[i] = rng.randrange(256)
    return bytes(out)


def _set_xattr(path: Path, name: str, value: bytes) -> None:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise XattrsUnsupported(
                e.errno, f"cannot set {name} on {path} ({e.strerror}): generate trees on a filesystem "
                "with user xattrs (set TMPDIR or the factory's tmp_dir)"
            ) from e
        raise


@dataclass
class ContentTree:
    """A deterministic tree: every byte, name, mode, xattr and link is a function of
    (seed, profile, layer)."""

    root: Path
    seed: str
    profile: str
    manifest: Manifest

    @classmethod
    def generate(cls, root: str | os.PathLike, seed: object, profile: str = "small", *,
                 layer: str | None = None) -> ContentTree:
        """Write the tree into `root` (created if needed, must be empty).  With `layer`, the
        tree is one layer of a container image: the content goes under /<layer>/ and the
        layer adds /etc/layer-<layer> and its own /etc/os-release (upper layers hide lower)."""
        prof = PROFILES[profile]
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise FileExistsError(errno.EEXIST, "content tree root is not empty", str(root))
        seed = str(seed)
        gen = _Generator(root, _rng(seed, profile, layer))
        if layer is None:
            gen.profile_tree(root, prof)
        else:
            gen.profile_tree(gen.dir(root / layer, 0o755), prof)
            etc = gen.dir(root / "etc", 0o755)
            gen.file(etc / f"layer-{layer}", f"layer {layer} seed {seed}\n".encode(), 0o644)
            gen.file(etc / "os-release", f"ID=erofs-test\nLAYER={layer}\n".encode(), 0o644)
            shared = gen.dir(root / "shared", 0o755)
            gen.file(shared / f"from-{layer}.bin", gen.rng.randbytes(5000), 0o644)
        os.chmod(root, 0o755)
        gen.fix_mtimes()
        return cls(root, seed, profile, Manifest.from_tree(root))


class _Generator:
    def __init__(self, root: Path, rng: random.Random):
        self.root = root
        self.rng = rng
        self.paths: list[Path] = []

    def dir(self, path: Path, mode: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        self.paths.append(path)
        return path

    def file(self, path: Path, data: bytes, mode: int) -> Path:
        path.write_bytes(data)
        os.chmod(path, mode)
        self.paths.append(path)
        return path

    def profile_tree(self, top: Path, p: Profile) -> None:
        rng = self.rng
        large = self.dir(top / "large", 0o755)
        for i in range(p.large_files):
            size = p.large_size + rng.randrange(1, BLOCK_SIZE)  # never block-aligned
            self.file(large / f"large-{i}.bin", _data(rng, size, compressible=i % 2 == 1), 0o644)

        small = self.dir(top / "small", 0o755)
        modes = [0o644, 0o600, 0o640, 0o444, 0o755]
        for i in range(p.small_files):
            size = _SMALL_SIZES[i % len(_SMALL_SIZES)]
            self.file(small / f"s{i:03d}-{size}.dat", _data(rng, size, compressible=i % 3 == 0), modes[i % 5])
        self.file(small / "with space.txt", b"a name with a space\n", 0o644)
        self.file(small / "ünïcödé-名前.txt", b"unicode name\n", 0o644)
        self.file(small / ("n" * 250), b"a 250-byte name\n", 0o644)

        many = self.dir(top / "many", 0o755)
        for i in range(p.many_files):
            self.file(many / f"f{i:05d}", f"{i}:{rng.getrandbits(64):016x}\n".encode(), 0o644)

        sparse = self.dir(top / "sparse", 0o755)
        for i in range(p.sparse_files):
            path = sparse / f"sparse-{i}.img"
            with open(path, "wb") as f:  # hole, data, hole, data, hole up to the end
                f.seek(p.sparse_size // 8 + i * BLOCK_SIZE)
                f.write(rng.randbytes(BLOCK_SIZE + 123))
                f.seek(p.sparse_size // 2 + 7)
                f.write(b"middle")
                f.truncate(p.sparse_size + 100)
            os.chmod(path, 0o644)
            self.paths.append(path)

        links = self.dir(top / "links", 0o755)
        target = self.file(links / "hard-a", _data(rng, 5000, compressible=False), 0o644)
        os.link(target, links / "hard-b")
        os.link(target, small / "hard-c")  # a group of three, across directories
        pair = self.file(links / "hard-xattr", b"hard link with xattrs\n", 0o600)
        _set_xattr(pair, "user.linked", b"shared by both names")
        os.link(pair, links / "hard-xattr-2")
        for name, dest in [
            ("sym-rel", "../small/s000-1.dat"),
            ("sym-dir", "../many"),
            ("sym-abs", "/etc/hostname"),
            ("sym-dangling", "does/not/exist"),
            ("sym-long", "/".join(["long-component"] * 14)),
        ]:
            (links / name).symlink_to(dest)
            self.paths.append(links / name)

        xdir = self.dir(top / "xattrs", 0o755)
        _set_xattr(xdir, "user.dir", b"xattr on a directory")
        for i in range(6):
            path = self.file(xdir / f"x{i}", f"file {i} with xattrs\n".encode(), 0o644)
            _set_xattr(path, "user.common", b"same on every file (shared xattr)")
            _set_xattr(path, f"user.only.{i}", rng.randbytes(1 + i * 40))
        _set_xattr(xdir / "x0", "user.empty", b"")
        _set_xattr(xdir / "x1", "user.big", rng.randbytes(1500))
        _set_xattr(large / "large-0.bin", "user.on.large", b"1")

        empty = self.dir(top / "empty", 0o755)
        for i in range(3):
            self.file(empty / f"empty-{i}", b"", 0o644)
        self.dir(empty / "empty-dir", 0o755)
        self.dir(empty / "nested" / "empty", 0o755)
        os.chmod(empty / "nested", 0o700)
        self.dir(empty / "sticky", 0o1777)

        deep = top / "deep"
        for d in range(1, p.depth + 1):
            deep = self.dir(deep / f"d{d}", 0o755)
        self.file(deep / "bottom.txt", b"bottom\n", 0o644)
        os.chmod(top / "deep", 0o755)

    def fix_mtimes(self) -> None:
        """Same mtime everywhere; deepest first, so that setting it on an entry does not
        change its directory's afterwards."""
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            for name in dirnames + filenames:
                os.utime(Path(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
        os.utime(self.root, (FIXED_MTIME, FIXED_MTIME))
