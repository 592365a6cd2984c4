"""Shared machinery and assertion helpers for the shared-domain tests (`domain_id=`).

The domain tests run many short mount sequences, so one cache filesystem and one on-demand
daemon serve a whole test module (`shared_daemon`, tests/fscache/conftest.py) and every test
gets a `Rig`: its view of that daemon (only the requests made since the test began), a mount
table, a fresh `Oracle`, and names that no other test uses (a fresh volume key means a cold
cache).  A fresh cache filesystem, daemon start and cache withdrawal cost 1.5-2 s per test
under TCG; sharing them keeps the set fast.

Every check names the rule it enforces and, when it fails, prints what a maintainer looks
at: the fscache tables now and the changes since the test began, the daemon's requests,
cache files against the predicted paths, and the kernel log of the test.
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from erofs_domains.guest.fscache.daemons import DaemonWindow
from erofs_domains.guest.fscache.oracle import MountResult, Oracle, volume_key_for
from erofs_domains.guest.images import ErofsImage
from erofs_domains.guest.manifest import Mismatch
from erofs_domains.guest.mounts import ErofsMount, MountError, MountTable
from erofs_domains.guest.observe.cachedir import CacheDirListing, predict_path
from erofs_domains.guest.observe.snapshot import FscacheSnapshot, SnapshotDiff


def kernel_oracle() -> Oracle:
    """The model with this kernel's limits (the rule table's sysfs name length)."""
    from erofs_domains.guest.kernel_features import detect

    return Oracle(sysfs_name_max=detect().sysfs_name_max)

PAGE = 4096


def layer_sample(image: ErofsImage, layer: str) -> list[str]:
    """A few small files of one layer of a layered image (paths in its manifest)."""
    want = [f"/{layer}/small/s008-4096.dat", f"/{layer}/small/s009-4097.dat", f"/{layer}/links/hard-a",
            f"/shared/from-{layer}.bin", f"/etc/layer-{layer}"]
    return [p for p in want if p in image.manifest]


def layer_large(image: ErofsImage, layer: str) -> list[str]:
    """The big files of one layer (the ranges a "read it all" fetches)."""
    return [p for p in image.manifest.files() if p.startswith(f"/{layer}/large/") or p.startswith(f"/{layer}/sparse/")]


def round_up(n: int, align: int = PAGE) -> int:
    return -(-n // align) * align


# ----------------------------------------------------------------------------- request log
def opens(requests: Iterable[dict]) -> Counter:
    """OPEN requests per (volume key, cookie key)."""
    return Counter((r["volume_key"], r["cookie_key"]) for r in requests if r.get("op") == "OPEN")


def closes(requests: Iterable[dict]) -> Counter:
    return Counter((r.get("volume_key"), r.get("cookie_key")) for r in requests if r.get("op") == "CLOSE")


def reads(requests: Iterable[dict], volume: str | None = None, cookie: str | None = None) -> list[dict]:
    return [r for r in requests if r.get("op") == "READ"
            and (volume is None or r.get("volume_key") == volume)
            and (cookie is None or r.get("cookie_key") == cookie)]


def read_bytes(requests: Iterable[dict], volume: str | None = None, cookie: str | None = None) -> int:
    return sum(r.get("len") or 0 for r in reads(requests, volume, cookie))


def overlapping_reads(rs: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of READs of one object (volume, cookie) whose ranges intersect: data fetched twice."""
    out = []
    by_obj: dict[tuple, list[dict]] = {}
    for r in rs:
        by_obj.setdefault((r.get("volume_key"), r.get("cookie_key")), []).append(r)
    for group in by_obj.values():
        group = sorted(group, key=lambda r: r["off"])
        for a, b in zip(group, group[1:]):
            if b["off"] < a["off"] + a["len"]:
                out.append((a, b))
    return out


def render_reads(rs: list[dict]) -> str:
    rows = [(r.get("msg_id"), r.get("volume_key"), r.get("cookie_key"), r.get("off"), r.get("len")) for r in rs]
    return tabulate(rows, headers=("msg", "volume", "cookie", "off", "len"))


# ----------------------------------------------------------------------------- content
def check_files(image: ErofsImage, mount: ErofsMount, paths: Iterable[str] | None = None) -> list[Mismatch]:
    """Compare files under the mount with the image manifest: all of it (`paths=None`,
    which reads everything) or only the given manifest paths (size and sha256)."""
    if paths is None:
        return image.verify(mount.path)
    out = []
    for p in paths:
        exp = image.manifest[p]
        try:
            data = (mount.path / p.lstrip("/")).read_bytes()
        except OSError as e:
            out.append(Mismatch(p, "error", None, f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"))
            continue
        if exp.size is not None and len(data) != exp.size:
            out.append(Mismatch(p, "size", exp.size, len(data)))
        elif exp.sha256 and hashlib.sha256(data).hexdigest() != exp.sha256:
            out.append(Mismatch(p, "sha256", exp.sha256[:16], hashlib.sha256(data).hexdigest()[:16]))
    return out


# ----------------------------------------------------------------------------- the per-test rig
@dataclass
class Member:
    """One mount request: an image mounted under some fsid (default its own), in a domain or
    not, with `device=` names (default: none, the on-disk tags name the blobs)."""

    image: ErofsImage
    fsid: str
    domain: str | None = None
    devices: tuple[str, ...] = ()

    @property
    def blob_names(self) -> list[str]:
        """Cookie names of the extra devices, in device-table order."""
        return list(self.devices) if self.devices else self.image.device_cookies

    @property
    def volume(self) -> str:
        return volume_key_for(self.fsid, self.domain)

    def blob_files(self) -> dict[str, Path]:
        """cookie name -> file the daemon must serve for it."""
        out = {self.fsid: self.image.path}
        for name, path in zip(self.blob_names, self.image.device_paths):
            out[name] = path
        return out

    def blob_sizes(self) -> dict[str, int]:
        """cookie name -> size the daemon answers `copen` with (the blob file's size)."""
        out = {self.fsid: self.image.blobs[self.image.fsid].size}
        for name, orig in zip(self.blob_names, self.image.device_cookies):
            out[name] = self.image.blobs[orig].size
        return out

    def describe(self) -> str:
        opts = [f"fsid={self.fsid}"] + ([f"domain_id={self.domain}"] if self.domain is not None else [])
        opts += [f"device={d}" for d in self.devices]
        return f"{self.image.name} -o {','.join(opts)}"


@dataclass
class Outcome:
    member: Member
    mid: int
    predicted: MountResult
    mount: ErofsMount | None = None
    error: MountError | None = None

    @property
    def errno(self) -> int:
        return self.error.errno if self.error else 0

    @property
    def errname(self) -> str:
        return "OK" if not self.errno else errno.errorcode.get(self.errno, str(self.errno))


@dataclass
class Rig:
    """What a domain test works with (see the module docstring)."""

    daemon: DaemonWindow  # the module's daemon as this test sees it
    mounts: MountTable
    kmsg: object
    artifacts: Path
    names: object  # unique(prefix) -> str
    oracle: Oracle = field(default_factory=lambda: kernel_oracle())
    before: FscacheSnapshot | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    _mid: int = 0
    _by_path: dict = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        return self.daemon.cache_dir

    def name(self, prefix: str) -> str:
        """A short name no other test (or earlier run on this cache) uses: a fresh volume key."""
        return self.names(prefix)

    def snapshot(self) -> FscacheSnapshot:
        """/proc/fs/fscache only (the shared cache dir is listed per volume: `cache_listing`)."""
        return FscacheSnapshot.take()

    # -- mounting ------------------------------------------------------------------------
    def member(self, image: ErofsImage, domain: str | None = None, *, fsid: str | None = None,
               devices: Iterable[str] = ()) -> Member:
        return Member(image, fsid or image.fsid, domain, tuple(devices))

    def serve(self, member: Member) -> None:
        for name, path in member.blob_files().items():
            self.daemon.serve_blob(name, path)

    def mount(self, image_or_member, domain: str | None = None, *, fsid: str | None = None,
              devices: Iterable[str] = (), rule: str = "oracle", check: bool = True) -> Outcome:
        """Serve the blobs, ask the oracle, mount; with `check`, the errno must be the oracle's."""
        m = image_or_member if isinstance(image_or_member, Member) else \
            self.member(image_or_member, domain, fsid=fsid, devices=devices)
        self.serve(m)
        self._mid += 1
        predicted = self.oracle.mount(self._mid, m.fsid, m.domain, m.blob_names)
        out = Outcome(m, self._mid, predicted)
        try:
            out.mount = self.mounts.mount_erofs(m.fsid, m.domain, m.devices)
            self._by_path[out.mount.path] = self._mid
        except MountError as e:
            out.error = e
        self.outcomes.append(out)
        if check:
            self.check_errno(out, rule)
        return out

    def check_errno(self, out: Outcome, rule: str = "oracle") -> None:
        """The mount's errno is the oracle's prediction."""
        if out.errno != out.predicted.errno:
            self.fail(f"{rule}: mount {out.member.describe()} -> expected {out.predicted.errname} "
                      f"({out.predicted.message}), got {out.errname}",
                      str(out.error) if out.error else "(mounted)")

    def must_mount(self, image_or_member, domain: str | None = None, **kw) -> ErofsMount:
        out = self.mount(image_or_member, domain, **kw)
        if out.mount is None:
            self.fail(f"{kw.get('rule', 'oracle')}: mount {out.member.describe()} failed", str(out.error))
        return out.mount

    def umount(self, mount: ErofsMount) -> tuple[tuple[str, str], ...]:
        """Unmount; returns the (volume, cookie) pairs the oracle says are released now."""
        mid = self._by_path.pop(mount.path)
        self.mounts.umount(mount)
        # a mount the oracle expected to fail (a failed check) is not in the model
        return self.oracle.umount(mid) if mid in self.oracle.mounts() else ()

    def umount_all(self) -> None:
        for m in reversed(list(self.mounts.active)):
            if m.path in self._by_path:
                self.umount(m)

    def served_sizes(self) -> dict[str, int]:
        """Predicted cache file path -> copen size, for every cookie this test's mounts opened."""
        out = {}
        for o in self.outcomes:
            sizes = o.member.blob_sizes()
            for vol, cookie in o.predicted.opened:
                out.setdefault(predict_path(vol, cookie), sizes[cookie])
        return out

    def volumes_used(self) -> set[str]:
        return {o.member.volume for o in self.outcomes}

    # -- reporting -----------------------------------------------------------------------
    def report(self, rule: str, detail: str = "", *, snap: FscacheSnapshot | None = None,
               since: FscacheSnapshot | None = None, listing: CacheDirListing | None = None,
               predicted: Iterable[str] | None = None, requests_since: int | None = None) -> str:
        """An assertion message: the rule, the facts, then the tables."""
        snap = snap or self.snapshot()
        title = "changes over the interval checked" if since is not None else "changes since the test began"
        since = since or self.before
        out = [f"RULE BROKEN: {rule}"]
        if detail:
            out.append(detail)
        out.append("mounts of this test (oracle prediction vs kernel):\n" + tabulate(
            [(o.mid, o.member.describe(), o.predicted.errname, o.errname,
              "live" if o.mid in set(self._by_path.values()) else "-") for o in self.outcomes],
            headers=("id", "mount", "expected", "got", "state")))
        out.append("expected by the oracle: volumes " + ", ".join(sorted(self.oracle.volumes())) + "\n"
                   + "cookies " + ", ".join(f"{v}/{c}" for v, c in sorted(self.oracle.cookies())))
        out.append(snap.erofs().render())
        if since is not None:
            out.append(f"{title}\n" + since.diff(snap).render())
        if listing is not None:
            if predicted is not None:
                out.append(listing.expected_vs_actual(predicted).render())
            out.append(listing.render())
        out.append(self.daemon.render(last=60, since=requests_since))
        log = [str(line) for line in self.kmsg.lines()][-30:]
        out.append("kernel log (last lines of this test):\n" + "\n".join(log))
        return "\n\n".join(out)

    def fail(self, rule: str, detail: str = "", **kw) -> None:
        raise AssertionError(self.report(rule, detail, **kw))

    # -- channel checks ------------------------------------------------------------------
    def expect_state(self, rule: str, *, timeout: float = 8.0) -> FscacheSnapshot:
        """Wait until the live erofs volumes and cookies in /proc/fs/fscache are the oracle's
        (each cookie once); released objects go away asynchronously."""
        want_v = set(self.oracle.volumes())
        want_c = Counter(self.oracle.cookies())
        deadline = time.monotonic() + timeout
        while True:
            snap_all = self.snapshot()
            snap = snap_all.erofs()
            got_v = {v.key for v in snap.volumes}
            vb = snap.volumes_by_id
            got_c = Counter((vb[c.volume_id].key, c.key_text) for c in snap.cookies if c.volume_id in vb)
            # The stats gauges move after the /proc lists (fscache_free_volume/_cookie()):
            # settled once they count what the lists show (no other fscache user here).
            settled = snap.stats is None or (snap.stat("Cookies", "v") == len(snap_all.volumes)
                                             and snap.stat("Cookies", "n") == len(snap_all.cookies))
            if got_v == want_v and got_c == want_c and settled:
                return snap_all
            if time.monotonic() > deadline:
                rows = [("volume", v, v in want_v, v in got_v) for v in sorted(want_v | got_v)]
                rows += [("cookie", f"{v} / {c}", want_c[(v, c)], got_c[(v, c)])
                         for v, c in sorted(set(want_c) | set(got_c))]
                rows.append(("stats", "Cookies v= / n=", f"{len(snap_all.volumes)} / {len(snap_all.cookies)}",
                             f"{snap.stat('Cookies', 'v')} / {snap.stat('Cookies', 'n')}"))
                self.fail(rule, f"fscache objects differ from the oracle after {timeout:.0f} s:\n"
                          + tabulate(rows, headers=("kind", "key", "expected", "in /proc")), snap=snap_all)
            time.sleep(0.05)

    def _expect_requests(self, rule: str, ops: tuple[str, ...], since: int | None, timeout: float,
                         want_opens: Counter | None = None, settle: bool = True) -> Counter:
        """OPEN and/or CLOSE requests per (volume, cookie) equal the oracle's.  Device OPENs and
        all CLOSEs are sent by fscache workers after mount/umount returned: wait for the daemon
        to go idle, then poll until equal (a late surplus shows in the next check)."""
        want = {"OPEN": +Counter(self.oracle.expected_opens() if want_opens is None else want_opens),
                "CLOSE": +Counter(self.oracle.expected_closes())}
        count = {"OPEN": opens, "CLOSE": closes}
        deadline = time.monotonic() + timeout
        if settle:
            self.daemon.wait_idle()
        while True:
            reqs = self.daemon.requests(since)
            got = {op: +count[op](reqs) for op in ops}
            if all(got[op] == want[op] for op in ops):
                return got.get("OPEN", Counter())
            if time.monotonic() > deadline:
                rows = [(op, v, c, want[op][(v, c)], got[op][(v, c)]) for op in ops
                        for v, c in sorted(set(want[op]) | set(got[op]), key=str)
                        if want[op][(v, c)] != got[op][(v, c)]]
                self.fail(rule, "requests per cookie differ from the oracle:\n"
                          + tabulate(rows, headers=("op", "volume", "cookie", "expected", "daemon saw")),
                          requests_since=since)
            time.sleep(0.05)

    def expect_opens(self, rule: str, *, since: int | None = None, expected: Counter | None = None,
                     timeout: float = 8.0) -> Counter:
        """OPEN requests per (volume, cookie) are the oracle's (or `expected`); returns them."""
        return self._expect_requests(rule, ("OPEN",), since, timeout, expected)

    def expect_closes(self, rule: str, *, since: int | None = None, timeout: float = 8.0) -> None:
        """CLOSE requests per cookie are the oracle's (one per release of an opened cookie)."""
        self._expect_requests(rule, ("CLOSE",), since, timeout)

    def expect_requests(self, rule: str, *, since: int | None = None, timeout: float = 8.0,
                        settle: bool = True) -> None:
        """Both OPEN and CLOSE requests per cookie are the oracle's (`settle=False`: do not wait
        for the daemon to go idle first, only poll the log until they are)."""
        self._expect_requests(rule, ("OPEN", "CLOSE"), since, timeout, settle=settle)

    def cache_listing(self, volumes: Iterable[str] | None = None) -> CacheDirListing:
        return CacheDirListing.scan(self.cache_dir, self.volumes_used() if volumes is None else volumes)

    def expect_cache_files(self, rule: str, *, volumes: Iterable[str] | None = None,
                           sizes: dict[str, int] | None = None, timeout: float = 5.0) -> CacheDirListing:
        """Data files of this test's volumes are exactly the oracle's committed files, and
        each has the xattr object size the daemon gave in `copen` (`sizes`: path -> size)."""
        vols = set(self.volumes_used() if volumes is None else volumes)
        predicted = {p for p in self.oracle.committed_files() if p.split("/")[1][1:] in vols}
        if sizes is None:
            sizes = {p: s for p, s in self.served_sizes().items() if p in predicted}
        deadline = time.monotonic() + timeout
        while True:
            # a file is linked in after its CLOSE was sent (cachefiles_withdraw_cookie()): poll
            listing = self.cache_listing(vols)
            cmp = listing.expected_vs_actual(predicted)
            wrong = []
            for path, size in sizes.items():
                f = listing.file(path)
                if f is None or f.xattr is None or f.xattr.object_size != size or f.size != round_up(size):
                    wrong.append((path, round_up(size), size, None if f is None else f.size,
                                  None if f is None or f.xattr is None else f.xattr.object_size))
            if cmp.ok and not wrong:
                return listing
            if time.monotonic() > deadline:
                detail = (f"{len(cmp.missing)} predicted cache file(s) missing, {len(cmp.unexpected)} unexpected, "
                          f"{len(wrong)} with the wrong size")
                if wrong:
                    detail += "\n" + tabulate(wrong, headers=("file", "want size", "want object_size", "size",
                                                              "xattr object_size"))
                self.fail(rule, detail, listing=listing, predicted=predicted)
            time.sleep(0.05)

    def expect_content(self, rule: str, image: ErofsImage, mount: ErofsMount,
                       paths: Iterable[str] | None = None) -> None:
        bad = check_files(image, mount, paths)
        if bad:
            self.fail(rule, f"{mount.path} ({mount.options}): {len(bad)} file(s) differ from the manifest of "
                      f"{image.name}:\n" + "\n".join(map(str, bad[:20])))

    def expect_stat(self, rule: str, diff: SnapshotDiff, want: dict[tuple[str, str], int]) -> None:
        """Stats deltas (section, counter) -> value."""
        bad = [(s, k, v, diff.stat(s, k)) for (s, k), v in want.items() if diff.stat(s, k) != v]
        if bad:
            self.fail(rule, "fscache stats deltas differ:\n"
                      + tabulate(bad, headers=("section", "counter", "expected", "got")), snap=diff.after,
                      since=diff.before)

