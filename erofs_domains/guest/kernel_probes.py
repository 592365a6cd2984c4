"""Probes: what the running kernel shows about a version rule, asked at start without crashing it.

A rule of erofs_domains/guest/kernel_features.py is a claim about a range of releases; where the kernel can answer
cheaply, the features step asks it instead, and the answer wins over the range (a stable tree
with a backport, a patched development tree). The range stays as the cross-check: a probe that
disagrees with it shows in the features table as "probed X, the table says Y for this version:
the table is wrong or the tree is patched".

Each probe returns (holds, what it saw), or None where it cannot tell here (no tracefs mounted,
no root, no mkfs.erofs, the filesystem not registered). Probes that need a mount (only
`sysfs_path_ioctl`) make a 4 KiB-block image of an empty directory with the mkfs under test,
loop-mount it read-only, ask the ioctl and unmount: well under a second in a TCG guest.

Not probed, and why:
- `sysfs_name_truncated`: the cut shows only on a `<domain_id>,<fsid>` name, i.e. a mount in
  fscache mode (a daemon and a cache) or, from 6.12, a file-backed mount with `domain_id`; the
  boundary that matters (6.11 against 6.12) has no file-backed mounts, so the range decides.
- the behaviours (`death_read_enobufs`, `unaligned_write_refused`, `restore`, ...): they need a
  daemon, a cache and failures; the tests themselves observe them.
- the known bugs: probing them crashes the kernel (tests/host does it in a VM of its own).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

Answer = tuple[bool, str] | None

TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
FS_IOC_GETFSSYSFSPATH = 0x80811501  # _IOR(0x15, 1, struct fs_sysfs_path {u8 len; u8 name[128]})
SYS_FSOPEN, SYS_FSCONFIG = 430, 431  # the same number on every architecture (new syscall table)
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING = 0, 1
FSOPEN_CLOEXEC = 1


def ondemand_tracepoints(tracefs: tuple[Path, ...] = TRACEFS) -> Answer:
    """include/trace/events/cachefiles.h's on-demand events, as tracefs lists them."""
    for root in tracefs:
        events = root / "events"
        if events.is_dir():
            have = sorted(p.name for p in (events / "cachefiles").glob("cachefiles_ondemand_*"))
            if have:
                return True, f"{len(have)} events/cachefiles/cachefiles_ondemand_* in {root}"
            return False, f"no events/cachefiles/cachefiles_ondemand_* in {root}"
    return None  # tracefs not mounted: cannot tell


def fscache_procfs(proc: Path = Path("/proc")) -> Answer:
    """/proc/fs/fscache: a symlink into /proc/fs/netfs (6.8+) or a directory of its own."""
    p = proc / "fs" / "fscache"
    if p.is_symlink():
        return True, f"{p} -> {os.readlink(p)}"
    if p.is_dir():
        return False, f"{p} is a directory"
    return None  # no fscache at all: cannot tell


def _fsconfig(fstype: str, key: str, value: str | None) -> int | None:
    """0 when the filesystem's parser accepts `key` (a flag, or a string `value`), else the errno;
    None where fsopen() itself fails (no such filesystem, not permitted, no new mount API)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC)
    if fd < 0:
        return None
    try:
        if value is None:
            rc = libc.syscall(SYS_FSCONFIG, fd, FSCONFIG_SET_FLAG, key.encode(), None, 0)
        else:
            rc = libc.syscall(SYS_FSCONFIG, fd, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
        return 0 if rc == 0 else ctypes.get_errno()
    finally:
        os.close(fd)


def registered(fstype: str, proc: Path = Path("/proc/filesystems")) -> bool:
    try:
        return any(line.split()[-1] == fstype for line in proc.read_text().splitlines() if line.strip())
    except OSError:
        return False


def option_known(key: str, value: str | None = None, fsconfig: Callable = _fsconfig) -> Answer:
    """erofs_fc_parse_param() knows `key` (fsconfig() answers 0; an unknown one is EINVAL). Nothing
    is mounted: the context is dropped unused."""
    if fsconfig is _fsconfig and not registered("erofs"):
        return None  # fsopen() would load the module (request_module): not on the host's behalf
    rc = fsconfig("erofs", key, value)
    shown = key if value is None else f"{key}={value}"
    if rc is None:
        return None
    if rc == 0:
        return True, f"fsconfig(erofs, {shown}): accepted"
    if rc == errno.EINVAL:
        return False, f"fsconfig(erofs, {shown}): EINVAL (unknown parameter)"
    return None  # another errno says nothing about the parser


def sysfs_path_ioctl(mkfs: str | None, run=subprocess.run) -> Answer:
    """FS_IOC_GETFSSYSFSPATH on a loop mount of an empty image: `erofs/<name>` from 6.11, ENOTTY
    before (erofs left s_sysfs_name empty)."""
    if not mkfs or os.geteuid() != 0:
        return None
    with tempfile.TemporaryDirectory(prefix="erofs-probe-") as tmp:
        src, img, mnt = Path(tmp, "src"), Path(tmp, "probe.img"), Path(tmp, "mnt")
        src.mkdir()
        mnt.mkdir()
        try:
            made = run([mkfs, str(img), str(src)], capture_output=True, timeout=30)
            if made.returncode != 0:
                return None
            mounted = run(["mount", "-t", "erofs", "-o", "loop,ro", str(img), str(mnt)],
                          capture_output=True, timeout=30)
            if mounted.returncode != 0:
                return None
        except (OSError, subprocess.TimeoutExpired):
            return None
        try:
            fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                buf = fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, bytes(129))
                answer: Answer = True, "FS_IOC_GETFSSYSFSPATH: " + buf[1:1 + buf[0]].decode(errors="replace")
            except OSError as e:
                answer = (False, "FS_IOC_GETFSSYSFSPATH: ENOTTY") if e.errno == errno.ENOTTY else None
            finally:
                os.close(fd)
        finally:
            run(["umount", str(mnt)], capture_output=True, timeout=30)
        return answer


# rule -> (what is asked, the probe). `mkfs` is the mkfs.erofs under test (None: not given).
# Only NEEDS_CONFIG probes are run where the kernel lacks the rule's options: they observe the
# option too (no tracepoints without CONFIG_EVENT_TRACING). The others ask what the range alone
# decides: erofs' parser knows `inode_share` on 7.0+ whether or not CONFIG_EROFS_FS_PAGE_CACHE_SHARE
# is set (erofs_fc_parse_param() then logs it as not supported), `fsid=` on 6.x without
# CONFIG_EROFS_FS_ONDEMAND likewise.
NEEDS_CONFIG = frozenset({"ondemand_trace"})
PROBES: dict[str, tuple[str, Callable[[str | None], Answer]]] = {
    "ondemand_trace": ("tracefs events/cachefiles", lambda mkfs: ondemand_tracepoints()),
    "netfs_procfs": ("/proc/fs/fscache", lambda mkfs: fscache_procfs()),
    "fscache_backend": ("erofs option fsid=", lambda mkfs: option_known("fsid", "probe")),
    "pagecache_share": ("erofs option inode_share", lambda mkfs: option_known("inode_share")),
    "sysfs_path_ioctl": ("FS_IOC_GETFSSYSFSPATH on a loop mount", sysfs_path_ioctl),
}


def run_all(mkfs: str | None, wanted=None) -> dict[str, tuple[bool, str]]:
    """Every probe that can tell on this machine: rule -> (holds, what was seen)."""
    out = {}
    for rule, (_what, probe) in PROBES.items():
        if wanted is not None and rule not in wanted:
            continue
        try:
            answer = probe(mkfs)
        except Exception:  # noqa: BLE001  a probe that breaks tells nothing; the range decides
            answer = None
        if answer is not None:
            out[rule] = answer
    return out
