"""Bad mount options and bad images: each must fail with its documented errno and log line
(or work, where the kernel copes), never oops, and leave nothing behind.

Two tables drive the tests: MOUNT_OPTION_CASES (fsid/domain_id lengths and characters,
device= counts, device tags, block size) and CORRUPT_IMAGE_CASES (images the daemon serves
truncated or with precise corruptions of the superblock, inodes and directories, plus a few
seeded bit-flip rounds). One cache and daemon serve the whole module; every case mounts under
fsids/domains of its own. The leak and kernel-log checks run after every case (autouse).

Not here: a 253..255-byte fsid in a domain hits `kernel BUG at fs/cachefiles/key.c:47` and
wedges the guest; tests/host/test_kernel_bug.py runs it in a VM of its own.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from erofs_domains.base.names import unique
from erofs_domains.guest.erofs_format import S_IFMT, S_IFREG, ErofsMeta
from erofs_domains.guest.fscache.faults import (
    Row,
    errname,
    errnames,
    mkfs_tree,
    readable,
)
from erofs_domains.guest.mounts import FS_IOC_GETFSSYSFSPATH, MountError, sysfs_name
from erofs_domains.guest.observe.cachedir import CacheDirListing, predict_path

SHARED_DAEMON_ARGS: list[str] = []
SHARED_CACHE_MIB = 64

EUCLEAN = errno.EUCLEAN  # the kernel's EFSCORRUPTED


# --------------------------------------------------------------------------- mount options

def name_of(length: int, *, prefix: str = "k", fill: str = "k") -> str:
    """A unique name of exactly `length` bytes (unique prefix, padded)."""
    head = unique(prefix)
    if length < len(head):
        raise ValueError(f"{length} bytes is too short for a unique name")
    return head + fill * (length - len(head))


@dataclass(frozen=True)
class OptionCase:
    id: str
    what: str  # the README's words
    fsid: Callable[[], str | None]
    domain: Callable[[], str | None] | None = None
    image: str = "single"  # single | blobdev | bs1024
    devices: str = "image"  # image: the image's own device= options; none; extra: one too many
    source: str = "none"  # none | file (the image file itself: a file-backed mount)
    errno: int | tuple[int, ...] = 0  # 0: the mount works
    log: str | None = None  # regex the kernel log must show
    check: str = ""  # for working mounts: sysfs-bang | sysfs-null | cachefile
    rule: str = "fscache_backend"  # erofs_domains/guest/kernel_features.py RULES: where this case applies

    def expected(self) -> str:
        if self.errno:
            errs = self.errno if isinstance(self.errno, tuple) else (self.errno,)
            return f"mount fails {errnames(errs)}" + (f"; log `{readable(self.log)}`" if self.log else "")
        extra = {"sysfs-bang": "; sysfs dir shows `!` for `/` (FS_IOC_GETFSSYSFSPATH keeps the `/`)",
                 "sysfs-null": "; sysfs name `<domain>,(null)`",
                 "cachefile": ""}.get(self.check, "")
        return "mounts, content correct" + extra


def _same(length: int, **kw) -> Callable[[], str]:
    return lambda: name_of(length, **kw)


def _fixed(text: str) -> Callable[[], str]:
    return lambda: text


MOUNT_OPTION_CASES = [
    OptionCase("fsid-empty", "`fsid=` (empty)", _fixed(""), errno=errno.EINVAL, log=r"Bad value for 'fsid'"),
    OptionCase("domain-empty", "`fsid=F,domain_id=` (empty domain)", _same(12), domain=_fixed(""),
               errno=errno.EINVAL, log=r"Bad value for 'domain_id'"),
    OptionCase("fsid-248", "fsid of 248 bytes, no domain (volume dir `Ierofs,<fsid>` = 255 bytes)", _same(248)),
    OptionCase("fsid-249", "fsid of 249 bytes, no domain (volume dir name 256 bytes)", _same(249),
               errno=errno.ENOBUFS, log=r"CacheFiles: Lookup Ierofs,k\S* failed with error -36"),
    OptionCase("fsid-250", "fsid of 250 bytes, no domain (volume key > 255)", _same(250),
               errno=errno.ENOMEM, log=r"failed to register volume for erofs,k"),
    OptionCase("fsid-slash", "fsid with `/`, no domain", lambda: unique("a") + "/b",
               errno=errno.ENOBUFS, log=r"CacheFiles: Lookup Ierofs,a\S*/b failed with error -13"),
    OptionCase("domain-fsid-248", "fsid of 248 bytes in a domain", _same(248), domain=lambda: unique("d")),
    OptionCase("domain-fsid-252", "fsid of 252 bytes in a domain (longest cookie key cachefiles takes)",
               _same(252), domain=lambda: unique("d")),
    OptionCase("domain-fsid-256", "fsid of 256 bytes in a domain (cookie key > 255)", _same(256),
               domain=lambda: unique("d"), errno=errno.EINVAL, log=r"failed to get cookie for k"),
    OptionCase("domain-fsid-slash", "fsid with `/` in a domain (the cookie key is encoded)",
               lambda: unique("s") + "/x", domain=lambda: unique("d"), check="sysfs-bang"),
    OptionCase("domain-249", "domain_id of 249 bytes", _same(12), domain=_same(249, prefix="d", fill="d"),
               errno=errno.ENOBUFS, log=r"CacheFiles: Lookup Ierofs,d\S* failed with error -36"),
    OptionCase("domain-250", "domain_id of 250 bytes", _same(12), domain=_same(250, prefix="d", fill="d"),
               errno=errno.ENOMEM, log=r"failed to register volume for erofs,d"),
    OptionCase("domain-slash", "domain_id with `/`", _same(12), domain=lambda: unique("d") + "/e",
               errno=errno.ENOBUFS, log=r"CacheFiles: Lookup Ierofs,d\S*/e failed with error -13"),
    OptionCase("domain-no-fsid", "`domain_id=D` without `fsid`, source `none` (not fscache mode)",
               _fixed(None), domain=lambda: unique("d"), errno=errno.ENOENT),
    OptionCase("domain-no-fsid-file", "`domain_id=D` without `fsid`, source an image file (file-backed mount)",
               _fixed(None), domain=lambda: unique("d"), source="file", check="sysfs-null",
               rule="file_backed_mount"),
    OptionCase("devices-too-many", "two `device=` for an image with one extra device", _same(12),
               image="blobdev", devices="extra", errno=errno.EINVAL,
               log=r"extra devices don't match \(ondisk 1, given 2\)"),
    OptionCase("devices-unexpected", "`device=` for an image without a device table", _same(12),
               devices="extra", errno=errno.EINVAL, log=r"extra devices don't match \(ondisk 0, given 1\)"),
    OptionCase("empty-device-tag", "image with an empty device tag and no `device=`", _same(12),
               image="blobdev", devices="none", errno=errno.EINVAL, log=r"empty device tag @ pos \d+"),
    OptionCase("blksz-1024", "image with 1024-byte blocks", _same(12), image="bs1024",
               errno=errno.EINVAL, log=r"unsupported blksize for fscache mode"),
]


@pytest.fixture(scope="module")
def bs1024_image(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("bs1024-tree")
    (tree / "hello.txt").write_bytes(b"1024-byte blocks\n" * 100)
    (tree / "sub").mkdir()
    (tree / "sub" / "data.bin").write_bytes(os.urandom(9000))
    return mkfs_tree(tmp_path_factory.mktemp("bs1024") / "bs1024.erofs", tree, "-b1024")


def sysfs_ioctl(path: Path) -> str | None:
    """FS_IOC_GETFSSYSFSPATH of a mount ("erofs/<name>"), None where it fails (ENOTTY before 6.11)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, bytes(129))
    except OSError:
        return None
    finally:
        os.close(fd)
    return buf[1:1 + buf[0]].decode(errors="surrogateescape")


def spot_check(image, root: Path, n: int = 4) -> list[str]:
    """Compare a few small files with the manifest (a full verify is slow under TCG)."""
    files = [p for p in image.manifest.files() if (image.manifest[p].size or 0) < 20000][:n]
    bad = []
    for p in files:
        try:
            got = hashlib.sha256((root / p.lstrip("/")).read_bytes()).hexdigest()
        except OSError as e:
            bad.append(f"{p}: {errname(e.errno)}")
            continue
        if got != image.manifest[p].sha256:
            bad.append(f"{p}: sha256 {got[:16]} != manifest {image.manifest[p].sha256[:16]}")
    return bad


@pytest.mark.parametrize("case", MOUNT_OPTION_CASES, ids=lambda c: c.id)
def test_mount_options(case: OptionCase, fault_env, tiny_images, bs1024_image, kmsg, require, features):
    """Each bad option fails with its errno and log line; each edge that works mounts and reads."""
    require.rule(case.rule)
    if case.image == "bs1024":
        image = None
        fsid = case.fsid()
        fault_env.serve_file(fsid, bs1024_image)
        devices: list[str] = []
    else:
        image = tiny_images.blobdev("bad-blobdev") if case.image == "blobdev" else tiny_images.single("bad-single")
        fsid = case.fsid()
        if fsid:
            fault_env.serve(image, fsid=fsid)
        devices = list(image.devices)
    if case.devices == "none":
        devices = []
    elif case.devices == "extra":
        devices = devices + [unique("extra")]
    domain = case.domain() if case.domain else None
    source = "none"
    backing = None
    if case.source == "file":
        backing = fault_env.cache_dir / f"{unique('img')}.erofs"  # ext4 (has read_folio), not the overlayfs /tmp
        shutil.copyfile(image.path, backing)
        source = str(backing)

    mark = kmsg.mark()
    try:
        m = fault_env.mounts.mount_erofs(fsid, domain_id=domain, devices=devices, source=source)
    except MountError as e:
        if backing is not None:
            backing.unlink()
        if not case.errno:
            pytest.fail(f"{case.id} ({case.what}): the mount should work but failed: {e}\n{fault_env.render()}",
                        pytrace=False)
        want = case.errno if isinstance(case.errno, tuple) else (case.errno,)
        assert e.errno in want, (
            f"{case.id} ({case.what}): expected {errnames(want)}, got {errname(e.errno)}\n{e}\n{fault_env.render()}")
        if case.log:
            assert any(line.seq > mark for line in kmsg.grep(case.log)), (
                f"{case.id}: no kernel log line matching {case.log!r}; the mount's log:\n" + "\n".join(e.log))
        return
    try:
        want = case.errno if isinstance(case.errno, tuple) else (case.errno,)
        assert not case.errno, (f"{case.id} ({case.what}): the mount should fail with {errnames(want)} but it "
                                f"worked; mountinfo: {m.mountinfo}\n{fault_env.render()}")
        bad = spot_check(image, m.path)
        assert not bad, f"{case.id}: content differs from the manifest:\n" + "\n".join(bad)
        info = m.mountinfo
        if fsid:
            assert info["options"].get("fsid") == fsid, f"mountinfo options: {info['raw']}"
        if domain:
            assert info["options"].get("domain_id") == domain, f"mountinfo options: {info['raw']}"
        if case.check == "sysfs-bang":
            # kobject names cannot hold '/': sysfs turns it into '!' (kobject_set_name_vargs())
            expected = Path("/sys/fs/erofs") / sysfs_name(fsid, domain, features.sysfs_name_max)
            assert "!" in expected.name and expected.is_dir(), (
                f"no sysfs dir {expected}; /sys/fs/erofs has {sorted(os.listdir('/sys/fs/erofs'))}")
            # ... while FS_IOC_GETFSSYSFSPATH (erofs: 6.11+) returns the s_sysfs_name as is, with the '/':
            # a path that does not exist under /sys/fs (observed on 6.12.117).
            reported = sysfs_ioctl(m.path)
            if features.holds("sysfs_path_ioctl"):
                want = "erofs/" + sysfs_name(fsid, domain, features.sysfs_name_max, bang=False)
                assert reported == want, (
                    f"rule sysfs_path_ioctl: FS_IOC_GETFSSYSFSPATH returned {reported!r}, expected {want!r}; "
                    f"sysfs has {expected}")
            else:  # 6.10 has the ioctl, but erofs leaves s_sysfs_name empty until 6.11: ENOTTY
                assert reported is None, (
                    f"rule sysfs_path_ioctl does not hold on {features.release}, yet FS_IOC_GETFSSYSFSPATH "
                    f"returned {reported!r}: the rule's range is wrong or the tree is patched")
        if case.check == "sysfs-null":
            expected = Path("/sys/fs/erofs") / sysfs_name("(null)", domain, features.sysfs_name_max)
            assert expected.is_dir(), (
                f"file-backed mount with domain_id and no fsid: expected sysfs dir {expected}; "
                f"/sys/fs/erofs has {sorted(os.listdir('/sys/fs/erofs'))}")
        fault_env.window.wait_idle()   # requests are logged after their answer (docs/protocol.md#waiting)
        if case.source == "file":
            assert not fault_env.requests("OPEN"), \
                f"a file-backed mount must not talk to the daemon\n{fault_env.render()}"
        else:
            opens = [r for r in fault_env.requests("OPEN") if r.get("cookie_key") == fsid]
            assert opens, f"{case.id}: no OPEN for cookie {fsid!r}\n{fault_env.render()}"
    finally:
        fault_env.mounts.umount(m)
        if backing is not None:
            backing.unlink()
    if case.check == "sysfs-bang":
        fault_env.control.wait_idle(timeout=10)
        want_path = predict_path(f"erofs,{domain}", fsid.encode())
        listing = CacheDirListing.scan(fault_env.cache_dir)
        assert want_path in listing.paths(), f"cache file {want_path} (encoded key) missing\n{listing.render()}"


def test_mount_option_table_is_well_formed():
    """Every case has a unique id and says what must happen (the README table is built from it)."""
    ids = [c.id for c in MOUNT_OPTION_CASES]
    assert len(ids) == len(set(ids))
    assert all(c.errno or not c.log for c in MOUNT_OPTION_CASES)


# --------------------------------------------------------------------------- corrupted images

ALLOWED_CORRUPTION_ERRNOS = {errno.EUCLEAN, errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT,
                             errno.ENOTDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.ELOOP, errno.ENOMEM,
                             errno.EBADMSG, errno.EOVERFLOW, errno.ESTALE, errno.ENOBUFS, errno.E2BIG,
                             errno.ERANGE, errno.ENODATA}


@dataclass(frozen=True)
class Op:
    kind: str  # listdir | stat | read | walk
    target: str  # "dir", "file", "control" or an absolute path
    errno: int = 0  # for walk: 0 = no errors at all, -1 = errors allowed (ALLOWED_CORRUPTION_ERRNOS)


@dataclass(frozen=True)
class CorruptCase:
    id: str
    what: str
    mutate: Callable[[ErofsMeta, dict], bytes | bytearray | None]
    mount_errno: int = 0
    ops: tuple[Op, ...] = ()
    log: str | None = None
    seal: bool = True  # recompute the superblock checksum after the mutation
    rule: str = "fscache_backend"  # erofs_domains/guest/kernel_features.py RULES: where this case applies

    def expected(self) -> str:
        if self.mount_errno:
            out = f"mount fails {errname(self.mount_errno)}"
        else:
            parts = []
            for op in self.ops:
                if op.kind == "walk":
                    parts.append("walk completes" + ("" if op.errno == 0 else " (errors allowed)"))
                else:
                    parts.append(f"{op.kind} {op.target}: {errname(op.errno)}")
            out = "mounts; " + ", ".join(parts)
        return out + (f"; log `{readable(self.log)}`" if self.log else "")


def _mut_truncate(size: int):
    return lambda meta, ctx: bytes(meta.data[:size])


def _mut_truncate_half(meta, ctx):
    return bytes(meta.data[: len(meta.data) // 2 // 4096 * 4096])


def _mut_magic(meta, ctx):
    meta.put(1024, "<I", 0x12345678)


def _mut_volname_bit(meta, ctx):
    meta.data[1024 + 64] ^= 0x01  # volume_name[0]; the checksum is not resealed


def _mut_byte(off: int, value: int):
    def mutate(meta, ctx):
        meta.data[1024 + off] = value
    return mutate


def _mut_incompat(meta, ctx):
    v = int.from_bytes(meta.data[1024 + 80:1024 + 84], "little")
    meta.put(1024 + 80, "<I", v | 0x80000000)


def _mut_root_is_file(meta, ctx):
    meta.put(1024 + 14, "<H", meta.lookup(ctx["file"]))


def _file_inode(meta, ctx):
    return meta.inode(meta.lookup(ctx["file"]))


def _mut_datalayout(meta, ctx):
    ino = _file_inode(meta, ctx)
    ifmt = int.from_bytes(meta.data[ino.off:ino.off + 2], "little")
    meta.put(ino.off, "<H", (ifmt & ~0xE) | (7 << 1))


def _mut_iformat(meta, ctx):
    ino = _file_inode(meta, ctx)
    ifmt = int.from_bytes(meta.data[ino.off:ino.off + 2], "little")
    meta.put(ino.off, "<H", ifmt | 0x10)


def _mut_mode(meta, ctx):
    ino = _file_inode(meta, ctx)
    meta.put(ino.off + 4, "<H", 0)


def _first_dirent(meta, ctx):
    return [e for e in meta.dirents(meta.lookup(ctx["dir"]))][0]


def _mut_nameoff0(meta, ctx):
    meta.put(_first_dirent(meta, ctx)[3] + 8, "<H", 0)


def _mut_nameoff_bogus(meta, ctx):
    ents = meta.dirents(meta.lookup(ctx["dir"]))
    meta.put(ents[-1][3] + 8, "<H", 4095)  # the last name starts beyond the directory's data


def _mut_nid_beyond(meta, ctx):
    name = ctx["file"].rsplit("/", 1)[1]
    (off,) = [e[3] for e in meta.dirents(meta.lookup(ctx["dir"])) if e[0] == name]
    meta.put(off, "<Q", (256 << 20) // 32)  # an inode 256 MiB into a 1.4 MB blob


def _mut_fuzz(seed: int, flips: int = 8):
    def mutate(meta, ctx):
        rng = random.Random(f"erofs-fuzz-{seed}")
        targets = []
        for nid in meta.all_nids():
            ino = meta.inode(nid)
            targets.append((ino.off, ino.isize))
            if ino.mode & S_IFMT == 0o040000:
                targets += meta.dir_blocks(ino)
        for _ in range(flips):
            off, length = rng.choice(targets)
            meta.data[off + rng.randrange(length)] ^= 1 << rng.randrange(8)
    return mutate


WALK_CLEAN = Op("walk", "/", 0)
WALK_ANY = Op("walk", "/", -1)
CONTROL_OK = Op("read", "control", 0)

CORRUPT_IMAGE_CASES = [
    CorruptCase("truncated-512", "image truncated to 512 bytes (no superblock)", _mut_truncate(512),
                mount_errno=errno.EINVAL, log=r"cannot find valid erofs superblock"),
    CorruptCase("truncated-4096", "image truncated to its first block", _mut_truncate(4096),
                ops=(Op("listdir", "/"), Op("listdir", "dir"), Op("stat", "file", EUCLEAN)),
                log=r"bogus i_mode \(0\)"),
    CorruptCase("truncated-half", "image truncated to half its size (the daemon pads with zeros)",
                _mut_truncate_half, ops=(WALK_CLEAN,)),
    CorruptCase("bad-magic", "superblock magic overwritten", _mut_magic, mount_errno=errno.EINVAL,
                log=r"cannot find valid erofs superblock"),
    CorruptCase("sb-checksum", "one bit flipped in the superblock (checksum no longer matches)", _mut_volname_bit,
                mount_errno=errno.EBADMSG, log=r"invalid checksum 0x[0-9a-f]+, 0x[0-9a-f]+ expected", seal=False),
    CorruptCase("sb-blkszbits", "superblock blkszbits = 13", _mut_byte(12, 13), mount_errno=errno.EINVAL,
                log=r"blkszbits 13 isn't supported"),
    CorruptCase("sb-dirblkbits", "superblock dirblkbits = 1", _mut_byte(90, 1), mount_errno=errno.EINVAL,
                log=r"dirblkbits 1 isn't supported"),
    CorruptCase("sb-extslots", "superblock sb_extslots = 255 (superblock larger than a block)",
                _mut_byte(13, 255), mount_errno=errno.EINVAL, log=r"invalid sb_extslots"),
    CorruptCase("sb-incompat", "unknown incompatible feature bit", _mut_incompat, mount_errno=errno.EINVAL,
                log=r"unidentified incompatible feature 80000000"),
    CorruptCase("sb-root-is-file", "root_nid pointing at a regular file", _mut_root_is_file,
                mount_errno=errno.EINVAL, log=r"rootino\(nid \d+\) is not a directory"),
    CorruptCase("inode-datalayout", "file inode with data layout 7", _mut_datalayout,
                ops=(Op("stat", "file", errno.EOPNOTSUPP), CONTROL_OK), log=r"unsupported datalayout 7 of nid"),
    CorruptCase("inode-iformat", "file inode with an unknown i_format bit", _mut_iformat,
                ops=(Op("stat", "file", errno.EOPNOTSUPP), CONTROL_OK), log=r"unsupported i_format \d+ of nid"),
    CorruptCase("inode-mode", "file inode with i_mode 0", _mut_mode,
                ops=(Op("stat", "file", EUCLEAN), CONTROL_OK), log=r"bogus i_mode \(0\) @ nid"),
    CorruptCase("dir-nameoff0", "directory block whose first nameoff is 0", _mut_nameoff0,
                ops=(Op("listdir", "dir", EUCLEAN), Op("stat", "file", EUCLEAN), CONTROL_OK),
                log=r"invalid de\[0\]\.nameoff 0 @ nid"),
    CorruptCase("dir-name-beyond", "directory entry whose name starts beyond the directory", _mut_nameoff_bogus,
                ops=(Op("listdir", "dir", EUCLEAN), CONTROL_OK), log=r"bogus dirent @ nid"),
    CorruptCase("dirent-nid-beyond", "directory entry pointing at an inode 256 MiB beyond the blob",
                _mut_nid_beyond, ops=(Op("stat", "file", EUCLEAN), CONTROL_OK), log=r"bogus i_mode \(0\)"),
    *[CorruptCase(f"bitflips-{seed}", f"8 random bit flips in inodes and directories (seed {seed})",
                  _mut_fuzz(seed), ops=(WALK_ANY,)) for seed in (1, 2)],
]


def walk(root: Path, max_entries: int = 400, max_read: int = 64 << 10) -> tuple[int, dict[str, int]]:
    """Visit at most `max_entries` entries, reading at most `max_read` bytes of each file."""
    errors: dict[str, int] = {}
    seen = 0
    todo = [root]
    while todo and seen < max_entries:
        d = todo.pop()
        try:
            names = sorted(os.listdir(d))
        except OSError as e:
            errors[str(d)] = e.errno
            continue
        for name in names:
            seen += 1
            if seen >= max_entries:
                break
            p = d / name
            try:
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    todo.append(p)
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb", buffering=0) as f:
                        f.read(max_read)
                elif stat.S_ISLNK(st.st_mode):
                    os.readlink(p)
            except OSError as e:
                errors[str(p)] = e.errno
    return seen, errors


@pytest.mark.parametrize("case", CORRUPT_IMAGE_CASES, ids=lambda c: c.id)
def test_corrupted_image(case: CorruptCase, fault_env, tiny_images, kmsg, tmp_path, require):
    """The daemon serves a damaged image: documented errno and log line, no oops, other files fine."""
    require.rule(case.rule)
    image = tiny_images.single("bad-single")
    meta = ErofsMeta(image.path.read_bytes())
    ctx = {"dir": "/small"}
    ctx["file"] = next(f"/small/{n}" for n, nid, _, _ in sorted(meta.dirents(meta.lookup("/small")))
                       if n.startswith("s0") and meta.inode(nid).mode & S_IFMT == S_IFREG)
    control = "/deep/d1/d2/d3/d4/bottom.txt"
    out = case.mutate(meta, ctx)
    if out is None:
        if case.seal:
            meta.seal()
        out = meta.data
    blob = tmp_path / f"{case.id}.erofs"
    blob.write_bytes(bytes(out))
    fsid = fault_env.serve_file(unique(f"c-{case.id[:12]}-"), blob)

    mark = kmsg.mark()
    try:
        m = fault_env.mounts.mount_erofs(fsid)
    except MountError as e:
        assert case.mount_errno, (
            f"{case.id} ({case.what}): the mount should work (then {case.expected()}) but failed: {e}\n"
            + fault_env.render())
        assert e.errno == case.mount_errno, (
            f"{case.id} ({case.what}): expected {errname(case.mount_errno)}, got {errname(e.errno)}\n{e}")
        _check_log(case, kmsg, mark)
        return
    assert not case.mount_errno, (
        f"{case.id} ({case.what}): the mount should fail with {errname(case.mount_errno)} but it worked\n"
        + fault_env.render())
    results = []
    for op in case.ops:
        path = m.path / (ctx.get(op.target, control if op.target == "control" else op.target)).lstrip("/")
        if op.kind == "walk":
            seen, errors = walk(m.path)
            results.append((op.kind, "/", f"{seen} entries", ", ".join(sorted({errname(e) for e in errors.values()}))))
            if op.errno == 0:
                assert not errors, f"{case.id}: walk hit errors:\n" + "\n".join(
                    f"  {p}: {errname(e)}" for p, e in errors.items())
            else:
                odd = {p: e for p, e in errors.items() if e not in ALLOWED_CORRUPTION_ERRNOS}
                assert not odd, f"{case.id}: unexpected errnos:\n" + "\n".join(
                    f"  {p}: {errname(e)}" for p, e in odd.items())
            continue
        got = 0
        try:
            if op.kind == "listdir":
                os.listdir(path)
            elif op.kind == "stat":
                os.stat(path)
            elif op.kind == "read":
                data = path.read_bytes()
                if op.target == "control":
                    assert data == b"bottom\n", f"{control}: read {data[:40]!r}"
        except OSError as e:
            got = e.errno
        results.append((op.kind, op.target, errname(op.errno), errname(got)))
        assert got == op.errno, (
            f"{case.id} ({case.what}): {op.kind} {path.relative_to(m.path)}: expected {errname(op.errno)}, "
            f"got {errname(got)}\nkernel log:\n" + "\n".join(str(x) for x in kmsg.since(mark)))
    _check_log(case, kmsg, mark)


def _check_log(case: CorruptCase, kmsg, mark: int) -> None:
    if case.log:
        lines = [x for x in kmsg.grep(case.log) if x.seq > mark]
        assert lines, (f"{case.id}: no kernel log line matching {case.log!r}; the test's lines:\n"
                       + "\n".join(str(x) for x in kmsg.since(mark)))


# --------------------------------------------------------------------------- README rows

OUTCOMES = [Row("mount options", c.what, c.expected(), c.rule) for c in MOUNT_OPTION_CASES] + [
    Row("mount options", "fsid of 253..255 bytes in a domain",
        "`kernel BUG at fs/cachefiles/key.c:47`, mount hangs (tests/host/test_kernel_bug.py, xfail)",
        "bug_cachefiles_key47"),
] + [Row("images", c.what, c.expected(), c.rule) for c in CORRUPT_IMAGE_CASES]
