"""The cachefiles on-disk layout: path prediction and cache-directory listing.

Layout written by cachefiles (Linux 5.17+, including 6.1 and 6.12)::

    <dir>/cache/I<volume key>/@<xx>/<cooked cookie key>
    <dir>/graveyard/...

``<xx>`` is the low byte of the fscache cookie hash, whose salt is the
volume hash (fs/netfs/fscache_volume.c, fs/netfs/fscache_cookie.c,
fs/netfs/fscache_main.c in 6.12; fs/fscache/*.c in 6.1); the cooked name is
produced by ``cachefiles_cook_key()`` (fs/cachefiles/key.c).

Everything here is pure Python except :meth:`CacheDirListing.scan`, which
reads a real directory (root is needed for a live cache: cachefiles creates
its directories with mode 0700).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from erofs_domains.guest import observables

__all__ = [
    "CACHE_XATTR",
    "CONTENT_NAMES",
    "KEY_MAX",
    "CacheDirListing",
    "CacheXattr",
    "DataFile",
    "GraveyardEntry",
    "PathComparison",
    "VolumeDir",
    "cook_key",
    "cookie_hash",
    "decode_cache_xattr",
    "fanout_dir",
    "fscache_hash",
    "hash32",
    "predict_path",
    "volume_dir_name",
    "volume_hash",
]

BytesLike = bytes | bytearray | memoryview | str

#: xattr carrying the cachefiles coherency data (fs/cachefiles/xattr.c).
CACHE_XATTR = "user.CacheFiles.cache"

#: ``enum cachefiles_content`` (fs/cachefiles/internal.h), stored on disk.
CONTENT_NAMES = {0: "NO_DATA", 1: "SINGLE", 2: "ALL", 3: "BACKFS_MAP", 4: "DIRTY"}

#: ``CACHEFILES_COOKIE_TYPE_DATA`` (fs/cachefiles/xattr.c).
TYPE_NAMES = {1: "DATA"}

#: Longest cookie key cachefiles_cook_key() accepts: BUG_ON(keylen > NAME_MAX - 3).
KEY_MAX = 252

_GOLDEN_RATIO_32 = 0x61C88647
_MASK = 0xFFFFFFFF

_CHARMAP = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-"


def _as_bytes(value: BytesLike) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def _rol32(v: int, n: int) -> int:
    return ((v << n) | (v >> (32 - n))) & _MASK


def hash32(value: int) -> int:
    """``__hash_32()`` of include/linux/hash.h (generic, x86-64 has no arch version)."""
    return (value * _GOLDEN_RATIO_32) & _MASK


def fscache_hash(salt: int, data: BytesLike) -> int:
    """``fscache_hash()`` (fs/netfs/fscache_main.c): ``data`` must be a multiple of 4 bytes."""
    raw = _as_bytes(data)
    if len(raw) % 4:
        raise ValueError(f"fscache_hash needs a multiple of 4 bytes, got {len(raw)}")
    x, y = 0, salt & _MASK
    for (a,) in struct.iter_unpack("<I", raw):
        # HASH_MIX(x, y, a)
        x ^= a
        y ^= x
        x = _rol32(x, 7)
        x = (x + y) & _MASK
        y = _rol32(y, 20)
        y = (y * 9) & _MASK
    return hash32(y ^ hash32(x))


def _pad4(raw: bytes, length: int | None = None) -> bytes:
    length = len(raw) if length is None else length
    size = (length + 3) // 4 * 4
    return raw.ljust(size, b"\0")


def volume_hash(volume_key: BytesLike) -> int:
    """Hash of a volume key, e.g. ``volume_hash("erofs,mydomain") == 0xa0ed89de``.

    fscache_alloc_volume() hashes ``[len] + key`` zero-padded to
    ``round_up(1 + len + 1, 4)`` bytes (note the extra NUL in the length).
    """
    key = _as_bytes(volume_key)
    if len(key) > 255:
        raise ValueError("volume keys longer than 255 bytes are refused by fscache")
    blob = bytes([len(key)]) + key
    return fscache_hash(0, _pad4(blob, 1 + len(key) + 1))


def cookie_hash(volume_key_hash: int, key: BytesLike) -> int:
    """Hash of a cookie key salted with its volume's hash (fscache_set_key())."""
    return fscache_hash(volume_key_hash, _pad4(_as_bytes(key)))


def _hex_digits(x: int) -> int:
    # how_many_hex_digits(): round_up(ilog2(x) + 1, 4) / 4, 0 for 0
    return (x.bit_length() + 3) // 4


def _printable(ch: int) -> bool:
    # cachefiles_filecharmap: '!'..'.' and '0'..0x7f (no space, no '/')
    return 33 <= ch <= 46 or 48 <= ch <= 127


def cook_key(key: BytesLike) -> str:
    """The object file name cachefiles derives from a cookie key (cachefiles_cook_key()).

    ``D<key>`` for printable keys, ``S``/``T`` + comma-separated big/little
    endian 32-bit hex words when that is shorter than base64, else
    ``E<pad>`` + cachefiles' own base64.
    """
    raw = _as_bytes(key)
    if len(raw) > KEY_MAX:
        # The kernel does not fail gracefully here: BUG_ON() in cachefiles_cook_key()
        # oopses the fscache worker and the mount hangs (docs/domains.md#key-lengths).
        raise ValueError(f"cookie key of {len(raw)} bytes would hit BUG_ON(keylen > NAME_MAX - 3)")
    if all(_printable(c) for c in raw):
        return "D" + raw.decode("ascii")

    padded = _pad4(raw)
    words_be = [w for (w,) in struct.iter_unpack(">I", padded)]
    words_le = [w for (w,) in struct.iter_unpack("<I", padded)]
    nbe = sum(1 + _hex_digits(w) for w in words_be)
    nle = sum(1 + _hex_digits(w) for w in words_le)
    groups = (len(raw) + 2) // 3
    pad = groups * 3 - len(raw)
    b64len = 2 + groups * 4
    if nbe < b64len or nle < b64len:
        words, sep = (words_be, "S") if nbe <= nle else (words_le, "T")
        out = []
        for w in words:
            out.append(sep)
            if w:
                out.append(f"{w:x}")
            sep = ","
        return "".join(out)

    out = ["E", chr(ord("0") + pad)]
    for i in range(0, len(raw), 3):
        chunk = raw[i:i + 3]
        acc = int.from_bytes(chunk, "little")
        for _ in range(4):
            out.append(_CHARMAP[acc & 63])
            acc >>= 6
    return "".join(out)


def volume_dir_name(volume_key: BytesLike) -> str:
    """``I`` + the raw volume key (fs/cachefiles/volume.c: no encoding at all)."""
    return "I" + _as_bytes(volume_key).decode("utf-8", "surrogateescape")


def fanout_dir(volume_key: BytesLike, cookie_key: BytesLike) -> str:
    """``@xx`` with xx = low byte of the cookie hash."""
    return "@%02x" % (cookie_hash(volume_hash(volume_key), cookie_key) & 0xFF)


def predict_path(volume_key: BytesLike, cookie_key: BytesLike) -> str:
    """Path of the data file relative to the cache root, e.g. ``cache/Ierofs,img1/@83/Dimg1``."""
    return "/".join(
        ("cache", volume_dir_name(volume_key), fanout_dir(volume_key, cookie_key), cook_key(cookie_key))
    )


@dataclass(frozen=True)
class CacheXattr:
    """Decoded ``user.CacheFiles.cache`` of a data file (``struct cachefiles_xattr``, packed)."""

    object_size: int
    zero_point: int
    type: int
    content: int
    aux: bytes = b""

    @property
    def content_name(self) -> str:
        return CONTENT_NAMES.get(self.content, f"?{self.content}")

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"?{self.type}")


def decode_cache_xattr(raw: bytes) -> CacheXattr:
    """Decode ``__be64 object_size; __be64 zero_point; u8 type; u8 content; u8 data[]``."""
    if len(raw) < 18:
        raise ValueError(f"cachefiles data xattr is {len(raw)} bytes, expected >= 18")
    object_size, zero_point, type_, content = struct.unpack_from(">QQBB", raw)
    return CacheXattr(object_size, zero_point, type_, content, bytes(raw[18:]))


@dataclass(frozen=True)
class DataFile:
    """One object file under ``cache/I<volume>/@xx/``."""

    path: str  # relative to the cache root, '/'-separated
    size: int
    allocated: int  # st_blocks * 512
    xattr: CacheXattr | None
    xattr_raw: bytes | None = None
    xattr_error: str | None = None

    @property
    def volume_key(self) -> str:
        return self.path.split("/")[1][1:]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class VolumeDir:
    """A ``cache/I<volume key>`` directory (``struct cachefiles_vol_xattr`` in its xattr)."""

    path: str
    key: str
    xattr_raw: bytes | None
    n_files: int


@dataclass(frozen=True)
class GraveyardEntry:
    """A top-level entry of ``graveyard/`` (objects cachefiles buried; the daemon should cull them)."""

    name: str
    is_dir: bool
    size: int


@dataclass(frozen=True)
class PathComparison:
    """Predicted vs actual data files; ``ok`` when both sets are equal."""

    matched: frozenset[str]
    missing: frozenset[str]
    unexpected: frozenset[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def render(self) -> str:
        rows = [(p, "ok") for p in sorted(self.matched)]
        rows += [(p, "MISSING") for p in sorted(self.missing)]
        rows += [(p, "UNEXPECTED") for p in sorted(self.unexpected)]
        return "cache files, predicted vs actual\n" + tabulate(rows, headers=("path", "status"))


def _read_xattr(path: str) -> tuple[bytes | None, str | None]:
    try:
        return os.getxattr(path, CACHE_XATTR, follow_symlinks=False), None
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None, None
        return None, f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"


@dataclass(frozen=True)
class CacheDirListing:
    """A walk of a cachefiles cache directory (the ``dir`` given to the daemon).

    Use :meth:`scan` on a real directory; :attr:`files` are the committed
    objects (a new object is an unlinked O_TMPFILE until it is withdrawn, so
    a mounted, never-released blob has no file yet).
    """

    root: str
    files: tuple[DataFile, ...] = ()
    volumes: tuple[VolumeDir, ...] = ()
    graveyard: tuple[GraveyardEntry, ...] = ()
    stray: tuple[str, ...] = field(default=())  # anything not matching the layout

    @classmethod
    def scan(cls, root: str | os.PathLike[str], volume_keys: Iterable[str] | None = None) -> CacheDirListing:
        """The whole cache directory, or (``volume_keys``) only these volumes' directories and
        the graveyard: a cache shared by many tests holds every test's volumes."""
        root_p = Path(root)
        files: list[DataFile] = []
        volumes: list[VolumeDir] = []
        stray: list[str] = []
        cache = root_p / "cache"
        if cache.is_dir():
            if volume_keys is None:
                vols = sorted(cache.iterdir())
            else:
                vols = [cache / volume_dir_name(k) for k in sorted(set(volume_keys))]
                vols = [v for v in vols if v.is_dir()]
            for vol in vols:
                rel_vol = f"cache/{vol.name}"
                if not vol.name.startswith("I") or not vol.is_dir() or vol.is_symlink():
                    stray.append(rel_vol)
                    continue
                n_before = len(files)
                for fan in sorted(vol.iterdir()):
                    rel_fan = f"{rel_vol}/{fan.name}"
                    if not (fan.name.startswith("@") and fan.is_dir() and not fan.is_symlink()):
                        stray.append(rel_fan)
                        continue
                    for obj in sorted(fan.iterdir()):
                        rel = f"{rel_fan}/{obj.name}"
                        st = obj.lstat()
                        if not stat.S_ISREG(st.st_mode):
                            stray.append(rel)
                            continue
                        raw, err = _read_xattr(str(obj))
                        decoded = None
                        if raw is not None:
                            try:
                                decoded = decode_cache_xattr(raw)
                            except ValueError as e:
                                err = str(e)
                        files.append(DataFile(rel, st.st_size, st.st_blocks * 512, decoded, raw, err))
                vraw, _ = _read_xattr(str(vol))
                volumes.append(VolumeDir(rel_vol, vol.name[1:], vraw, len(files) - n_before))
        graveyard: list[GraveyardEntry] = []
        grave = root_p / "graveyard"
        if grave.is_dir():
            for entry in sorted(grave.iterdir()):
                st = entry.lstat()
                graveyard.append(GraveyardEntry(entry.name, stat.S_ISDIR(st.st_mode), st.st_size))
        for entry in sorted(root_p.iterdir()) if root_p.is_dir() else ():
            if entry.name not in ("cache", "graveyard"):
                stray.append(entry.name)
        listing = cls(str(root_p), tuple(files), tuple(volumes), tuple(graveyard), tuple(stray))
        observables.cache_listing(listing)
        return listing

    def paths(self) -> frozenset[str]:
        """Relative paths of all data files."""
        return frozenset(f.path for f in self.files)

    def file(self, path: str) -> DataFile | None:
        for f in self.files:
            if f.path == path:
                return f
        return None

    def expected_vs_actual(self, predicted_paths: Iterable[str]) -> PathComparison:
        """Compare predicted relative paths (see :func:`predict_path`) with the data files found."""
        predicted = frozenset(predicted_paths)
        actual = self.paths()
        return PathComparison(predicted & actual, predicted - actual, actual - predicted)

    def render(self) -> str:
        rows = []
        for f in self.files:
            x = f.xattr
            rows.append((
                f.path, f.size, f.allocated,
                "-" if x is None else x.object_size,
                "-" if x is None else x.zero_point,
                "-" if x is None else x.type_name,
                "-" if x is None else x.content_name,
                f.xattr_error or "",
            ))
        out = [f"cache dir {self.root}",
               tabulate(rows, headers=("file", "size", "alloc", "obj_size", "zero_pt", "type", "content", "err"))]
        if self.graveyard:
            out.append(tabulate([(g.name, "dir" if g.is_dir else "file", g.size) for g in self.graveyard],
                                headers=("graveyard", "kind", "size")))
        if self.stray:
            out.append(tabulate([(s,) for s in self.stray], headers=("stray entry",)))
        return "\n\n".join(out)
