"""erofs_domains/guest/erofs_format.py: the one superblock parser, and ErofsMeta's checksum seal."""

from __future__ import annotations

import struct

from erofs_domains.guest.erofs_format import (
    COMPAT_SB_CHKSUM,
    EROFS_MAGIC,
    EROFS_SUPER_OFFSET,
    ErofsMeta,
    crc32c,
    parse_superblock,
)


def _image(root_nid: int = 36, meta_blkaddr: int = 2, compat: int = COMPAT_SB_CHKSUM) -> bytearray:
    data = bytearray(3 * 4096)
    sb = EROFS_SUPER_OFFSET
    struct.pack_into("<IIIBBH", data, sb, EROFS_MAGIC, 0, compat, 12, 0, root_nid)
    struct.pack_into("<I", data, sb + 40, meta_blkaddr)
    return data


def test_crc32c_is_the_kernels():
    # the standard check value of CRC-32C, with the kernel's seed and no final inversion
    assert crc32c(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283


def test_superblock_fields_the_meta_view_uses():
    sb = parse_superblock(bytes(_image()))
    assert (sb.root_nid, sb.meta_blkaddr, sb.block_size) == (36, 2, 4096)
    meta = ErofsMeta(_image())
    assert (meta.root_nid, meta.blksz, meta.iloc(36)) == (36, 4096, 2 * 4096 + 36 * 32)


def test_seal_writes_the_checksum_the_kernel_checks():
    meta = ErofsMeta(_image())
    meta.seal()
    sb = bytearray(meta.data[EROFS_SUPER_OFFSET:4096])
    (stored,) = struct.unpack_from("<I", sb, 4)
    sb[4:8] = bytes(4)
    assert stored == crc32c(0xFFFFFFFF, bytes(sb)) != 0   # erofs_superblock_csum_verify()
    unsealed = ErofsMeta(_image(compat=0))
    unsealed.seal()
    assert struct.unpack_from("<I", unsealed.data, EROFS_SUPER_OFFSET + 4) == (0,)
