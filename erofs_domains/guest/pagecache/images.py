"""Images for the page-cache sharing tests: explicit file lists, mkfs.erofs with
`--xattr-inode-digest`, and crafted digests that mkfs never writes.

mkfs.erofs (1.9+) records `sha256:` + the 32-byte SHA-256 of a file's data as the value of
the digest xattr (a long-prefix xattr with an empty name) of every non-empty regular file,
inline in the inode: one entry `{u8 name_len=0, u8 name_index=0x80|prefix, le16 size=39}`
followed by the value, padded to 4 bytes. A crafted image rewrites such a value in place
(`patch_value`): any length whose entry keeps the same 4-byte slot (37 to 40 bytes) fits
without moving anything. Small images keep their inodes in block 0, which the superblock
checksum covers (erofs_superblock_csum_verify(): crc32c from byte 1024 to the end of the
block), so `fix_sb_checksum` recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base import config
from erofs_domains.base.proc import CmdError, cmd
from erofs_domains.guest.erofs_format import COMPAT_SB_CHKSUM, EROFS_SUPER_OFFSET, crc32c
from erofs_domains.guest.pagecache.oracle import FileSpec

DIGEST_PREFIX = b"sha256:"
ENTRY_HEAD = 4  # struct erofs_xattr_entry: e_name_len, e_name_index, e_value_size


class ImageBuildError(RuntimeError):
    pass


def mkfs_digest(data: bytes) -> bytes | None:
    """The digest xattr value mkfs.erofs writes for a file (none for an empty file)."""
    return DIGEST_PREFIX + hashlib.sha256(data).digest() if data else None


def slot(value_len: int) -> int:
    """Bytes an inline xattr entry with an empty name takes (EROFS_XATTR_ALIGN)."""
    return (ENTRY_HEAD + value_len + 3) & ~3


def patch_value(image: bytearray, old: bytes, new: bytes) -> int:
    """Replace the one inline digest xattr whose value is `old` by `new`; returns its offset.

    Refuses what would not be an in-place edit: `old` not found exactly once, not preceded by
    an empty-name long-prefix entry head of its length, or `new` needing another slot size."""
    if not new:
        raise ValueError("an empty xattr value cannot be written in place")
    if slot(len(new)) != slot(len(old)):
        raise ValueError(f"a {len(new)}-byte value does not fit the {len(old)}-byte value's "
                         f"{slot(len(old))}-byte slot (fits {slot(len(old)) - ENTRY_HEAD - 3}.."
                         f"{slot(len(old)) - ENTRY_HEAD} bytes)")
    hits = [m.start() for m in re.finditer(re.escape(old), image)]
    if len(hits) != 1:
        raise ValueError(f"digest value {old[:12]!r}... found {len(hits)} times in the image, need exactly 1")
    at = hits[0]
    head = image[at - ENTRY_HEAD : at]
    if head[0] != 0 or not head[1] & 0x80 or int.from_bytes(head[2:4], "little") != len(old):
        raise ValueError(f"bytes before the digest value are not an inline long-prefix xattr entry "
                         f"head of size {len(old)}: {bytes(head).hex()}")
    image[at - 2 : at] = len(new).to_bytes(2, "little")
    image[at : at + len(old)] = b"\0" * len(old)
    image[at : at + len(new)] = new
    return at


SB_OFFSET = EROFS_SUPER_OFFSET


def fix_sb_checksum(image: bytearray) -> bool:
    """Recompute the superblock checksum if the image has one; True if it did."""
    compat = int.from_bytes(image[SB_OFFSET + 8 : SB_OFFSET + 12], "little")
    if not compat & COMPAT_SB_CHKSUM:
        return False
    blksz = 1 << image[SB_OFFSET + 12]
    block = bytearray(image[SB_OFFSET:blksz])
    block[4:8] = bytes(4)
    image[SB_OFFSET + 4 : SB_OFFSET + 8] = crc32c(0xFFFFFFFF, bytes(block)).to_bytes(4, "little")
    return True


@dataclass
class PcImage:
    """An image file with what each of its regular files is to the kernel."""

    path: Path
    files: dict[str, bytes]                       # content, by path inside the image
    specs: dict[str, FileSpec]
    digests: bool                                 # built with --xattr-inode-digest
    compressed: bool
    crafted: dict[str, bytes] = field(default_factory=dict)   # path -> patched digest value

    def spec_tuple(self) -> tuple[FileSpec, ...]:
        return tuple(self.specs[p] for p in sorted(self.specs))

    def pages(self, path: str) -> int:
        return -(-len(self.files[path]) // os.sysconf("SC_PAGE_SIZE"))


def _layout(dump: str, image: Path, path: str) -> int:
    try:
        out = cmd([dump, f"--path=/{path}", image]).stdout
    except CmdError as e:
        raise ImageBuildError(str(e)) from e
    m = re.search(r"Layout: (\d+)", out)
    if not m:
        raise ImageBuildError(f"{dump} --path=/{path} {image} printed no 'Layout: N':\n{out}")
    return int(m.group(1))


def layout_of(image: PcImage, path: str, dump: str | None = None) -> int:
    """The data layout dump.erofs reports for one file (0 plain, 1/3 compressed, 2 inline, 4 chunk-based)."""
    mkfs = config.current().mkfs or "mkfs.erofs"
    return _layout(dump or config.current().dump or str(Path(mkfs).with_name("dump.erofs")), image.path, path)


COMPRESSED_LAYOUTS = (1, 3)   # EROFS_INODE_COMPRESSED_FULL, _COMPACT


def write_sparse(path: Path, data: bytes, block: int = 4096) -> None:
    """Write `data` leaving every all-zero `block` a hole (mkfs.erofs finds holes with SEEK_DATA)."""
    with open(path, "wb") as f:
        zero = bytes(block)
        for off in range(0, len(data), block):
            chunk = data[off:off + block]
            if chunk != zero[:len(chunk)]:
                f.seek(off)
                f.write(chunk)
        f.truncate(len(data))


def build(dest: Path, files: dict[str, bytes], *, compress: bool = False, digests: bool = True,
          crafted: dict[str, bytes] | None = None, mkfs: str | None = None, dump: str | None = None,
          mkfs_args: tuple[str, ...] = (), sparse: bool = False, all_compressed: bool = True) -> PcImage:
    """Write `files` into a tree and build `dest` from it (kept if built before with the same inputs).

    `sparse` writes every all-zero 4 KiB block of the files as a hole; `mkfs_args` go to
    mkfs.erofs as they are (`--chunksize=4096`); `all_compressed=False` lets a compressed image
    keep files mkfs stored plain (too small or incompressible)."""
    mkfs = mkfs or config.current().mkfs or "mkfs.erofs"
    dump = dump or config.current().dump or str(Path(mkfs).with_name("dump.erofs"))
    crafted = dict(crafted or {})
    meta = dest.with_suffix(".json")
    inputs = [sorted((p, hashlib.sha256(d).hexdigest()) for p, d in files.items()), compress, digests,
              sorted((p, v.hex()) for p, v in crafted.items()), mkfs]
    if mkfs_args or sparse:
        inputs += [list(mkfs_args), sparse]
    recipe = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    if not (dest.exists() and meta.exists() and json.loads(meta.read_text()).get("recipe") == recipe):
        tree = dest.with_name(dest.name + ".tree")
        shutil.rmtree(tree, ignore_errors=True)
        for p, data in files.items():
            (tree / p).parent.mkdir(parents=True, exist_ok=True)
            if sparse:
                write_sparse(tree / p, data)
            else:
                (tree / p).write_bytes(data)
        argv = [mkfs, "--quiet", "-T0", "--all-root"]
        argv += ["--xattr-inode-digest"] if digests else []
        argv += ["-zlz4"] if compress else []
        argv += list(mkfs_args)
        try:
            cmd([*argv, dest, tree])
        except CmdError as e:
            raise ImageBuildError(str(e)) from e
        finally:
            shutil.rmtree(tree, ignore_errors=True)
        if crafted:
            image = bytearray(dest.read_bytes())
            for p, value in crafted.items():
                patch_value(image, mkfs_digest(files[p]), value)
            fix_sb_checksum(image)
            dest.write_bytes(bytes(image))
        meta.write_text(json.dumps({"recipe": recipe}))
    specs = {}
    for p, data in files.items():
        value = crafted.get(p, mkfs_digest(data)) if digests else None
        is_z = compress and bool(data) and _layout(dump, dest, p) in COMPRESSED_LAYOUTS
        if compress and data and not is_z and all_compressed:
            raise ImageBuildError(f"{p} of {dest} was stored uncompressed: give it compressible data")
        specs[p] = FileSpec(p, len(data), value, compressed=is_z)
    return PcImage(dest, dict(files), specs, digests, compress, crafted)
