"""The images of tests/pagecache, by name: small trees of known files, plain, compressed,
without digests, and crafted digests mkfs never writes.

Every file's data compresses (text lines), so the compressed image really stores every
non-empty file compressed (images.build() checks it with dump.erofs)."""

from __future__ import annotations

import random

from erofs_domains.guest.pagecache.images import mkfs_digest


def text(name: str, size: int) -> bytes:
    rng = random.Random(name)
    words = [f"{name}-{rng.getrandbits(24):06x}" for _ in range(32)]
    out = bytearray()
    i = 0
    while len(out) < size:
        out += f"{i:07d} {rng.choice(words)} {rng.choice(words)}\n".encode()
        i += 1
    return bytes(out[:size])


A = text("alpha", 64 << 10)
B = text("bravo", 96 << 10 | 123)          # not page aligned
D = text("delta", 40 << 10)
BASE = {"a": A, "b": B, "copy-of-a": A, "empty": b"", "sub/d": D}
OTHER = {"a": A, "x": text("xray", 48 << 10)}  # shares only `a` with BASE

# Same digest value as `a`, other size: mkfs never writes it (SIZE).
SIZECLASH = {"a-size": text("alpha-size", 24 << 10)}


def _w(n: int, tag: str) -> bytes:
    """n bytes starting `tag`, for hand-made digest values (no NUL)."""
    return (tag.encode() * 40)[:n]


# Pairs (domain_1, value_1) / (domain_2, value_2) that collide under a plausible key construction
# other than the kernel's (domain, NUL, value). Each pair lives in one image as files p and q;
# mount 1 (domain_1) reads p, mount 2 (domain_2) must not see it resident in q. Lengths stay
# within 37..40 bytes (patch_value()).
CRAFTED = {
    # domain then value, no separator: "d" + "1W" == "d1" + "W"
    "no-separator": ("d", b"1" + _w(38, "W"), "d1", _w(38, "W")),
    # value then domain (the fingerprint-first reading): "Xd1" + "0" == "X" + "d10"
    "value-first": ("0", _w(37, "X") + b"d1", "d10", _w(37, "X")),
    # one domain, one value a prefix of the other: only the size compare in
    # erofs_ishare_iget5_eq() keeps them apart
    "prefix-value": ("d", _w(38, "P"), "d", _w(38, "P") + b"!"),
}


def crafted_files(case: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    _, v1, _, v2 = CRAFTED[case]
    files = {"p": text(f"{case}-p", 32 << 10), "q": text(f"{case}-q", 32 << 10)}
    return files, {"p": v1, "q": v2}


def recipes() -> dict[str, dict]:
    """name -> keyword arguments of images.build()."""
    out = {
        "base": dict(files=BASE),
        "twin": dict(files=BASE),                       # the same files, built again: another image
        "other": dict(files=OTHER),
        "base-z": dict(files=BASE, compress=True),
        "base-nodigest": dict(files=BASE, digests=False),
        "sizeclash": dict(files=SIZECLASH, crafted={"a-size": mkfs_digest(A)}),
    }
    for case in CRAFTED:
        files, crafted = crafted_files(case)
        out[f"crafted-{case}"] = dict(files=files, crafted=crafted)
    for layout, kw in SHAPE_LAYOUTS.items():
        out[f"shapes-{layout}"] = dict(files=SHAPES, **kw)
    return out


# ---- file shapes for the doors (tests/pagecache/test_doors.py)
RA_WINDOW = 128 << 10       # VM_READAHEAD_PAGES: the default readahead window
BIG_FOLIO = 2 << 20         # the largest folio on x86-64 (PMD size)


def _sparse(size: int) -> bytes:
    """Data at the start, in the middle and at the end; zero blocks (holes, where kept) between."""
    out = bytearray(size)
    for at in (0, size // 2 & ~4095, size - 100):
        piece = text(f"sparse-{at}", 4096)
        out[at:at + len(piece)] = piece[:size - at]
    return bytes(out)


SHAPES = {
    "empty": b"",
    "1-byte": b"x",
    "one-block": text("one-block", 4096),
    "3-pages+1": text("three-pages", 3 * 4096 + 1),           # straddles an order-1 folio
    "ra-window+1": text("ra-window", RA_WINDOW + 1),           # one byte past the readahead window
    "big-folio+": text("big", BIG_FOLIO + 4096 + 17),          # larger than the largest folio
    "sparse": _sparse(1 << 20),                                # holes in chunk-indexed layouts
}

# layout -> build() arguments: plain (mkfs' default: tail packed inline), chunk-indexed with 4 KiB
# chunks (mkfs keeps holes only there: erofs_blob_write_chunked_file(); the plain layout writes
# zeros, erofs_write_unencoded_data()), and lz4 (files mkfs cannot shrink stay plain).
SHAPE_LAYOUTS = {
    "plain": dict(sparse=True),
    "chunked": dict(sparse=True, mkfs_args=("--chunksize=4096",)),
    "lz4": dict(sparse=True, compress=True, all_compressed=False),
}
