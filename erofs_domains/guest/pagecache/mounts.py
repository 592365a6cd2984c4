"""erofs mounts for page-cache sharing: on a loop device (`losetup -f --show`; `mount -o loop`
raced udev) or file-backed, with the options the test gives; LIFO cleanup, loop devices too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.base.proc import cmd
from erofs_domains.guest.mounts import MountError, MountTable, build_options, mountinfo, umount_or_detach


def share_options(domain_id: str | None, inode_share: bool = True, extra: tuple[str, ...] = ()) -> str:
    """`inode_share,domain_id=D,<extra>` (the fscache options' builder, `inode_share` first)."""
    return ",".join(filter(None, ["inode_share" if inode_share else "", build_options(None, domain_id), *extra]))


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
class PcMountTable(MountTable):
    """The mount table with image sources: a loop device per block-device mount, detached with it."""

    def mount(self, image, *, backing: str = "bdev", domain_id: str | None = None,
              inode_share: bool = True, extra: tuple[str, ...] = (), options: str | None = None) -> PcMount:
        """Mount `image` (a PcImage or a path); `options` overrides the composed option string."""
        path_of_image = Path(getattr(image, "path", image))
        opts = options if options is not None else share_options(domain_id, inode_share, tuple(extra))
        loop = _losetup("-f", "--show", "-r", str(path_of_image)) if backing == "bdev" else None
        try:
            return self.attach(loop or str(path_of_image), opts, lambda name, path: PcMount(
                name, path, path_of_image, backing, loop, opts, domain_id, inode_share))
        except MountError:
            if loop:
                _losetup("-d", loop)
            raise

    def umount(self, m: PcMount) -> None:
        umount_or_detach(m.path)  # a detached mount keeps its loop device: the leak check reports it
        self.active.remove(m)
        m.path.rmdir()
        if m.loopdev:
            _losetup("-d", m.loopdev)

    def table(self) -> list[tuple]:
        """What /proc/self/mountinfo says about each mount (the kernel's view of its options)."""
        rows = []
        for m in self.active:
            info = mountinfo(m.path)
            rows.append((m.name, m.loopdev or str(m.image), m.backing,
                         info["raw"] if info else "(not mounted)", "{}:{}".format(*m.dev)))
        return rows
