"""erofs mounts for page-cache sharing: on a loop device (`losetup -f --show`; `mount -o loop`
raced udev) or file-backed, with the options the test gives; LIFO cleanup, loop devices too."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base.proc import cmd
from erofs_domains.guest.mounts import (
    MS_RDONLY,
    MS_REMOUNT,
    MountError,
    mountinfo,
    sys_mount,
    umount_or_detach,
    unmount_all,
)


def share_options(domain_id: str | None, inode_share: bool = True, extra: tuple[str, ...] = ()) -> str:
    opts = ["inode_share"] if inode_share else []
    if domain_id is not None:
        opts.append(f"domain_id={domain_id}")
    return ",".join(opts + list(extra))


@dataclass
class PcMount:
    name: str
    path: Path
    image: Path
    backing: str                      # "bdev" or "file"
    loopdev: str | None
    options: str
    domain_id: str | None
    inode_share: bool

    @property
    def dev(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return os.major(st.st_dev), os.minor(st.st_dev)

    def describe(self) -> str:
        how = f"{self.loopdev}" if self.loopdev else "file-backed"
        return f"{self.name} ({how}, -o {self.options or '(none)'})"


def _losetup(*args: str) -> str:
    return cmd(["losetup", *args]).stdout.strip()


@dataclass
class PcMountTable:
    root: Path
    kmsg: object = None
    active: list[PcMount] = field(default_factory=list)
    counter: int = 0

    def mount(self, image, *, backing: str = "bdev", domain_id: str | None = None,
              inode_share: bool = True, extra: tuple[str, ...] = (), options: str | None = None) -> PcMount:
        """Mount `image` (a PcImage or a path); `options` overrides the composed option string."""
        path_of_image = Path(getattr(image, "path", image))
        opts = options if options is not None else share_options(domain_id, inode_share, tuple(extra))
        self.counter += 1
        name = f"m{self.counter}"
        target = self.root / name
        target.mkdir(parents=True, exist_ok=True)
        loop = _losetup("-f", "--show", "-r", str(path_of_image)) if backing == "bdev" else None
        mark = self.kmsg.mark() if self.kmsg else -1
        try:
            sys_mount(loop or str(path_of_image), target, "erofs", MS_RDONLY, opts)
        except OSError as e:
            log = [str(line) for line in self.kmsg.since(mark)] if self.kmsg else []
            target.rmdir()
            if loop:
                _losetup("-d", loop)
            raise MountError(e.errno, opts, log) from None
        m = PcMount(name, target, path_of_image, backing, loop, opts, domain_id, inode_share)
        self.active.append(m)
        return m

    def remount(self, m: PcMount, options: str) -> None:
        sys_mount("none", m.path, "erofs", MS_REMOUNT | MS_RDONLY, options)

    def umount(self, m: PcMount) -> None:
        umount_or_detach(m.path)  # a detached mount keeps its loop device: the leak check reports it
        self.active.remove(m)
        m.path.rmdir()
        if m.loopdev:
            _losetup("-d", m.loopdev)

    def close(self) -> list[str]:
        """Unmount everything left, LIFO, loop devices too; returns the errors."""
        return unmount_all(self.active, self.umount)

    def table(self) -> list[tuple]:
        """What /proc/self/mountinfo says about each mount (the kernel's view of its options)."""
        rows = []
        for m in self.active:
            info = mountinfo(m.path)
            rows.append((m.name, m.loopdev or str(m.image), m.backing,
                         info["raw"] if info else "(not mounted)", "{}:{}".format(*m.dev)))
        return rows
