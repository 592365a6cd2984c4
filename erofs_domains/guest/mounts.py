"""Mounting erofs in fscache mode, with errno-carrying errors and LIFO cleanup."""

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erofs_domains.base.proc import CmdError, WaitTimeout, wait_for
from erofs_domains.guest import kmsg as kmsg_mod
from erofs_domains.guest import observables
from erofs_domains.guest.kernel_features import SYSFS_NAME_MAX

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY = 1
MS_REMOUNT = 32
MNT_DETACH = 2
FS_IOC_GETFSSYSFSPATH = 0x80811501  # _IOR(0x15, 1, struct fs_sysfs_path {u8 len; u8 name[128]})


class MountError(OSError):
    """mount(2) failed: carries the errno, the options and the kernel log lines it caused."""

    def __init__(self, err: int, options: str, log: list):
        self.options = options
        self.log = log
        lines = "\n".join(f"    {line}" for line in log) or "    (no kernel log lines)"
        super().__init__(err, f"mount -t erofs -o {options} failed: {errno.errorcode.get(err, err)} "
                              f"({os.strerror(err)}); kernel log:\n{lines}")


def sysfs_name(fsid: str, domain_id: str | None, limit: int | None = SYSFS_NAME_MAX, bang: bool = True) -> str:
    """What erofs names the mount in /sys/fs/erofs (erofs_register_sysfs()): `<domain_id>,<fsid>`,
    cut at `limit` bytes as the kernel counts them (None: the whole name, 6.1's kasprintf());
    sysfs turns `/` into `!` (kobject_set_name_vargs()), FS_IOC_GETFSSYSFSPATH does not (bang=False)."""
    name = f"{domain_id},{fsid}" if domain_id is not None else fsid
    raw = name.encode("utf-8", "surrogateescape")
    if limit is not None:
        raw = raw[:limit]
    name = raw.decode("utf-8", "surrogateescape")
    return name.replace("/", "!") if bang else name


def mountinfo(path: Path) -> dict | None:
    """The /proc/self/mountinfo entry of `path`: fstype, source, super options."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            fields = pre.split()
            if fields[4] == str(path):
                fstype, source, sopts = post.split(" ", 2)
                opts = {}
                for o in sopts.split(","):
                    k, _, v = o.partition("=")
                    opts[k] = v if _ else True
                return {"fstype": fstype, "source": source, "options": opts, "raw": sopts}
    return None


def erofs_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - erofs " in line]


@dataclass
class ErofsMount:
    path: Path
    fsid: str
    domain_id: str | None
    devices: tuple[str, ...]
    options: str

    @property
    def mountinfo(self) -> dict | None:
        return mountinfo(self.path)

    @property
    def sysfs_dir(self) -> Path:
        """/sys/fs/<name> from FS_IOC_GETFSSYSFSPATH (erofs: 6.11+, rule sysfs_path_ioctl) where that
        directory exists, else computed from the options: 6.11's ioctl reports the 36-byte
        s_sysfs_name while its /sys/fs/erofs name is the whole `<domain_id>,<fsid>` (rule
        sysfs_name_truncated, 6.12), and a `/` in the name is a `!` in sysfs."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                buf = fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, bytes(129))
            finally:
                os.close(fd)
            n = buf[0]
            reported = Path("/sys/fs") / buf[1 : 1 + n].decode(errors="surrogateescape")
            if reported.is_dir():
                return reported
        except OSError:
            pass
        from erofs_domains.guest.kernel_features import detect

        return Path("/sys/fs/erofs") / sysfs_name(self.fsid, self.domain_id, detect().sysfs_name_max)


def build_options(fsid: str | None, domain_id: str | None = None, devices=(), **extra) -> str:
    opts = []
    if fsid is not None:
        opts.append(f"fsid={fsid}")
    if domain_id is not None:
        opts.append(f"domain_id={domain_id}")
    opts += [f"device={d}" for d in devices]
    for k, v in extra.items():
        opts.append(k if v is True else f"{k}={v}")
    return ",".join(opts)


def sys_mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags,
                     data.encode(errors="surrogateescape"))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sys_umount(target: Path, flags: int = 0) -> None:
    if _libc.umount2(str(target).encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def umount_when_idle(target: Path, timeout: float = 5.0) -> None:
    """umount(2), retried while it fails with EBUSY (a reader thread that just returned can
    still hold the mount for a moment); other errors raise at once, WaitTimeout if it stays
    busy for `timeout` seconds."""
    def attempt() -> str:
        try:
            sys_umount(target)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            return "EBUSY"
        return "unmounted"

    wait_for(attempt, what=f"umount {target} to stop failing EBUSY", timeout=timeout,
             until=lambda v: v == "unmounted")


def umount_or_detach(target: Path) -> None:
    """umount_when_idle(); a mount still busy after that is detached (MNT_DETACH), and the
    test fails through the leak check, which shows what still holds it."""
    try:
        umount_when_idle(target)
    except WaitTimeout:
        sys_umount(target, MNT_DETACH)


def unmount_all(active: list, umount: Callable[[Any], None]) -> list[str]:
    """Unmount what `active` still holds, last in first out, with `umount(m)` (which drops `m`
    from `active` once unmounted); an error (the mount call, a loop device's `losetup -d`, the
    mountpoint's rmdir) is collected as "<path>: <error>" and the mount dropped from `active`,
    so one that fails does not keep the others mounted. Returns the errors, [] if none."""
    errors = []
    while active:
        m = active[-1]
        try:
            umount(m)
        except (OSError, CmdError) as e:
            errors.append(f"{m.path}: {e}")
            if m in active:
                active.remove(m)
    return errors


@dataclass
class MountTable:
    """Mounts made by one test, of either backend; `close()` unmounts them last in first out,
    even after failures. Every mount attempt is recorded (observables: options and errno)."""

    root: Path
    kmsg: "kmsg_mod.KmsgChecker | None" = None
    active: list = field(default_factory=list)
    counter: int = 0

    def attach(self, source: str, options: str, make: Callable[[str, Path], Any]):
        """mount(2) `source` read-only with `options` at the next mountpoint; `make(name, path)`
        makes the table's entry. A failure raises MountError with the kernel log lines."""
        self.counter += 1
        name = f"m{self.counter}"
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        mark = self.kmsg.mark() if self.kmsg else -1
        try:
            sys_mount(source, path, "erofs", MS_RDONLY, options)
        except OSError as e:
            log = [str(line) for line in self.kmsg.since(mark)] if self.kmsg else []
            path.rmdir()
            observables.mount_result(options, e.errno)
            raise MountError(e.errno, options, log) from None
        observables.mount_result(options, 0)
        m = make(name, path)
        self.active.append(m)
        return m

    def mount_erofs(self, fsid: str | None, domain_id: str | None = None, devices=(), *,
                    source: str = "none", **extra) -> ErofsMount:
        """An fscache-mode mount (`fsid=`, `domain_id=`, `device=`)."""
        options = build_options(fsid, domain_id, devices, **extra)
        return self.attach(source, options, lambda _, path: ErofsMount(path, fsid, domain_id, tuple(devices), options))

    def remount(self, m: ErofsMount, options: str) -> None:
        sys_mount("none", m.path, "erofs", MS_REMOUNT | MS_RDONLY, options)

    def umount(self, m: ErofsMount) -> None:
        umount_or_detach(m.path)
        self.active.remove(m)
        m.path.rmdir()

    def close(self) -> list[str]:
        """Unmount everything left, LIFO; returns errors instead of stopping at the first."""
        return unmount_all(self.active, self.umount)
