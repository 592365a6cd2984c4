"""The cache directory: a fresh ext4 filesystem on a loop device for each test.

cachefiles refuses tmpfs (no `sync_fs`, cachefiles_add_cache() -> EOPNOTSUPP), so each test
gets ext4 on loop, copied from a template image instead of running mkfs every time.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.base.proc import CmdError, cmd, wait_for
from erofs_domains.base.scratch import work_root
from erofs_domains.guest.observe import procfs


def run(*argv: str) -> str:
    """stdout of a command that must succeed (CmdError otherwise)."""
    return cmd(argv).stdout.strip()


def template(size_mib: int) -> Path:
    """An empty ext4 image of `size_mib`, made once per guest and copied per test."""
    path = work_root() / f"ext4-template-{size_mib}M.img"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        with open(tmp, "wb") as f:
            f.truncate(size_mib << 20)
        # No journal: faster under TCG, and cachefiles does not need one.
        run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "nodiscard",
            "-m", "0", str(tmp))
        tmp.rename(path)
    return path


@dataclass
class CacheFs:
    """An ext4 filesystem on a loop device, mounted at `mountpoint`."""

    image: Path
    loopdev: str
    mountpoint: Path

    @classmethod
    def create(cls, name: str, size_mib: int = 512) -> "CacheFs":
        image = work_root() / f"{name}.img"
        run("cp", "--sparse=always", str(template(size_mib)), str(image))
        # `mount -o loop` raced udev in the guest; losetup -f --show does not.
        loopdev = run("losetup", "-f", "--show", str(image))
        mnt = work_root() / name
        mnt.mkdir(parents=True, exist_ok=True)
        try:
            run("mount", "-t", "ext4", loopdev, str(mnt))
        except CmdError as e:
            try:
                run("losetup", "-d", loopdev)
            except CmdError as e2:
                e.add_note(f"and releasing the loop device failed too: {e2}")
            raise
        return cls(image, loopdev, mnt)

    def destroy(self) -> None:
        def umount():
            r = cmd(["umount", str(self.mountpoint)], check=False)
            return r.returncode == 0 or "not mounted" in r.stderr, r.stderr.strip()

        wait_for(umount, what=f"cache filesystem {self.mountpoint} to unmount (EBUSY while in use)",
                 timeout=5.0, step=0.1, until=lambda v: v[0], show=lambda v: v[1])
        # the image is deleted right after: a loop device left bound to it would leak
        r = cmd(["losetup", "-d", self.loopdev], check=False)
        self.image.unlink(missing_ok=True)
        shutil.rmtree(self.mountpoint, ignore_errors=True)
        if r.returncode and "No such device" not in r.stderr:
            raise CmdError(r.args, r.returncode, r.stdout, r.stderr)


def cachefiles_free() -> bool:
    """/dev/cachefiles can be opened again only once the previous cache is fully unbound
    (its dev fd and every anon fd closed: cachefiles_daemon_release() drops the pincount)."""
    try:
        fd = os.open("/dev/cachefiles", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def wait_withdrawn(tag: str, timeout: float = 20.0) -> None:
    """Wait until the cache `tag` is withdrawn (state `-`) and /dev/cachefiles is free."""
    def state():
        caches = [c for c in procfs.read_caches() if c.name == tag]
        return {"caches": caches, "/dev/cachefiles free": cachefiles_free()}

    wait_for(state, timeout=timeout, until=lambda s: all(c.state == "-" for c in s["caches"])
             and s["/dev/cachefiles free"],
             what=f"cache {tag!r} to be withdrawn and /dev/cachefiles free (an anon fd still open "
                  f"somewhere pins it)")
