"""One test's page-cache sharing scenario: mounts, reads and drops done on the kernel and fed to
the oracle at the same time, then compared file by file.

`check()` fails naming the broken rule, with a table of what each mount sees (the file
operations each file got, resident pages seen through mmap + mincore, the oracle's
expectation), the mount table, the operations so far and the kernel's erofs log lines."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from tabulate import tabulate

from erofs_domains.guest.pagecache import probe
from erofs_domains.guest.pagecache.images import PcImage
from erofs_domains.guest.pagecache.mounts import PcMount, PcMountTable
from erofs_domains.guest.pagecache.oracle import RULES, MountSpec, Oracle

DATA_RULE = ("DATA", "every read through any mount returns the image's own data for that file")


@dataclass
class Row:
    mount: str
    path: str
    fops: str
    want_fops: str
    resident: int
    pages: int
    want_resident: bool
    group: str
    rule: str

    @property
    def ok(self) -> bool:
        want_pages = self.pages if self.want_resident else 0
        return self.fops == self.want_fops and self.resident == want_pages

    def cells(self):
        want = f"{self.pages if self.want_resident else 0}/{self.pages}"
        return (self.mount, self.path, self.fops, self.want_fops, f"{self.resident}/{self.pages}", want,
                self.group, self.rule, "" if self.ok else "<-- differs")


class Sharing:
    def __init__(self, mounts: PcMountTable, kmsg=None):
        self.mounts = mounts
        self.kmsg = kmsg
        self.oracle = Oracle()
        self.images: dict[str, PcImage] = {}
        self.by_name: dict[str, PcMount] = {}
        self.steps: list[str] = []
        self.bad_data: list[tuple] = []
        self.held: dict[tuple[str, str], int] = {}     # (mount, path) -> open fd
        self.used: dict[tuple[str, str], PcImage] = {}  # (domain, backing) -> an image mounted there

    # ---- operations (kernel and oracle in step)
    def mount(self, image: PcImage, *, backing: str = "bdev", domain_id: str | None = None,
              inode_share: bool = True, extra: tuple[str, ...] = (), lookup: bool = True) -> PcMount:
        m = self.mounts.mount(image, backing=backing, domain_id=domain_id, inode_share=inode_share,
                              extra=tuple(extra))
        self.oracle.mount(m.name, MountSpec(image.spec_tuple(), backing, inode_share, domain_id, image.digests))
        self.images[m.name] = image
        self.by_name[m.name] = m
        if inode_share and domain_id is not None:
            self.used.setdefault((domain_id, backing), image)
        self.steps.append(f"mount {image.path.name} as {m.describe()}")
        if lookup:
            self.lookup(m)
        return m

    def members(self, domain_id: str, *images: PcImage, backing: str = "bdev") -> list[PcMount]:
        """Mount each image, in order, as a member of the sharing domain `domain_id`."""
        return [self.mount(image, backing=backing, domain_id=domain_id) for image in images]

    def lookup(self, m: PcMount, paths=None) -> None:
        """Instantiate the inodes (stat) in a fixed order: which inode comes first decides the
        shared inode's aops and size."""
        for p in paths or sorted(self.images[m.name].files):
            os.stat(m.path / p)
            self.oracle.lookup(m.name, p)

    def read(self, m: PcMount, path: str) -> bytes:
        data = probe.read(m.path / path)
        self.oracle.read(m.name, path)
        self.steps.append(f"read {m.name}/{path}")
        want = self.images[m.name].files[path]
        if data != want:
            first = next((i for i, (a, b) in enumerate(zip(data, want)) if a != b), min(len(data), len(want)))
            self.bad_data.append((m.name, path, len(data), len(want), first))
        return data

    def read_all(self, m: PcMount) -> None:
        for p in sorted(self.images[m.name].files):
            self.read(m, p)

    def dontneed(self, m: PcMount, path: str) -> None:
        probe.dontneed(m.path / path)
        self.oracle.dontneed(m.name, path)
        self.steps.append(f"fadvise DONTNEED {m.name}/{path}")

    def hold(self, m: PcMount, path: str) -> None:
        """Keep the file open (its inode cannot be evicted) until release()."""
        self.held[(m.name, path)] = os.open(m.path / path, os.O_RDONLY)
        self.oracle.lookup(m.name, path)
        self.steps.append(f"open {m.name}/{path} and keep it open")

    def release(self, m: PcMount, path: str) -> None:
        os.close(self.held.pop((m.name, path)))
        self.steps.append(f"close {m.name}/{path}")

    def release_all(self) -> None:
        for (name, path) in list(self.held):
            self.release(self.by_name[name], path)

    def umount(self, m: PcMount) -> None:
        for path in [p for (name, p) in self.held if name == m.name]:
            self.release(m, path)
        self.mounts.umount(m)
        self.oracle.umount(m.name)
        del self.by_name[m.name]
        self.steps.append(f"umount {m.name}")

    def remount(self, m: PcMount, options: str) -> None:
        self.mounts.remount(m, options)
        self.steps.append(f"remount {m.name} -o {options}")

    def drop_caches(self, what: int = 3) -> None:
        probe.drop_caches(what)
        self.oracle.drop_caches(what, open_nodes=frozenset(self.held))
        self.steps.append(f"echo {what} > /proc/sys/vm/drop_caches"
                          + (f" ({len(self.held)} file(s) open)" if self.held else ""))

    def leftovers(self) -> str | None:
        """After every mount of the test is gone (LIFETIME): a new member of each domain the test
        used must find nothing resident, or a shared inode outlived its members."""
        if self.by_name:
            raise RuntimeError("leftovers() needs every mount of the test unmounted")
        rows = []
        for (d, backing), image in self.used.items():
            m = self.mounts.mount(image, backing=backing, domain_id=d)
            try:
                for p in sorted(image.files):
                    resident, pages = probe.resident_pages(m.path / p)
                    if resident:
                        rows.append((d, backing, p, f"{resident}/{pages}"))
            finally:
                self.mounts.umount(m)
        if not rows:
            return None
        return (f"rule LIFETIME broken: {RULES['LIFETIME']}\nafter the test unmounted everything, a new "
                "mount in its domains found pages resident:\n"
                + tabulate(rows, headers=["domain", "backing", "file", "resident"])
                + "\n\noperations:\n" + "\n".join(f"  {i + 1}. {s}" for i, s in enumerate(self.steps)))

    # ---- observation
    def observe(self, mounts=None) -> list[Row]:
        rows = []
        for m in mounts or list(self.by_name.values()):
            for p in sorted(self.images[m.name].files):
                full = m.path / p
                fops = probe.file_ops(full)
                resident, pages = probe.resident_pages(full)
                v = self.oracle.verdict(m.name, p)
                rows.append(Row(m.name, p, fops, "shared" if v.shared else "own", resident, pages,
                                self.oracle.resident(m.name, p), f"#{v.sid}" if v.shared else "-", v.rule))
        return rows

    def check(self, after: str = "", mounts=None) -> list[Row]:
        rows = self.observe(mounts)
        bad = [r for r in rows if not r.ok]
        if bad or self.bad_data:
            pytest.fail(self.report(rows, bad, after), pytrace=False)
        return rows

    def report(self, rows: list[Row], bad: list[Row], after: str = "") -> str:
        parts = []
        rules = []
        if self.bad_data:
            rules.append(DATA_RULE)
        for r in bad:
            if r.rule not in [x[0] for x in rules]:
                rules.append((r.rule, RULES[r.rule]))
        for name, text in rules:
            parts.append(f"rule {name} broken: {text}")
        if after:
            parts.append(f"after: {after}")
        parts.append("what each mount sees (fops: erofs_ishare_fops 'shared' or erofs_file_fops 'own'; "
                     "resident pages through mmap + mincore):\n" + tabulate(
                         [r.cells() for r in rows],
                         headers=["mount", "file", "fops", "expected", "resident", "expected", "group",
                                  "rule", ""]))
        if self.bad_data:
            parts.append("reads that returned other data:\n" + tabulate(
                self.bad_data, headers=["mount", "file", "bytes read", "bytes expected", "first difference at"]))
        parts.append("mounts:\n" + tabulate(self.mounts.table(),
                                            headers=["mount", "source", "backing", "mountinfo options", "dev"]))
        parts.append("operations:\n" + "\n".join(f"  {i + 1}. {s}" for i, s in enumerate(self.steps)))
        parts.append("kernel log (erofs):\n" + "\n".join(f"  {line}" for line in self.erofs_log()))
        return "\n\n".join(parts)

    def erofs_log(self) -> list[str]:
        if self.kmsg is None:
            return []
        return [str(x) for x in self.kmsg.lines() if "erofs" in x.text.lower()] or ["(none)"]
