"""Point-in-time captures of /proc/fs/fscache (+ optionally a cache directory) and diffs.

Typical use in a test::

    before = FscacheSnapshot.take(cache_dir=cache_root)
    ... mount, read, umount ...
    after = FscacheSnapshot.take(cache_dir=cache_root)
    d = before.diff(after)
    assert d.stat("Acquire", "n") == 1, d.render()

Volumes and cookies are matched by key (volume key; ``(volume key, cookie
key)``), never by debug id: ids are allocated from global counters and differ
from run to run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from tabulate import tabulate

from erofs_domains.guest import observables
from erofs_domains.guest.observe import procfs
from erofs_domains.guest.observe.cachedir import CacheDirListing, DataFile
from erofs_domains.guest.observe.procfs import Cache, Cookie, Volume

__all__ = [
    "EROFS_PREFIX",
    "NON_COUNTERS",
    "FscacheSnapshot",
    "SnapshotDiff",
    "cookie_identity",
    "erofs_only",
    "format_key",
]

EROFS_PREFIX = "erofs,"

#: Stats fields that are not event counters: ``LRU at=`` is the jiffies left on
#: the LRU timer (fscache_stats.c: ``timer_pending(...) ? expires - jiffies : 0``).
NON_COUNTERS = frozenset({("LRU", "at")})

CookieKey = tuple[str, bytes]


def format_key(key: bytes) -> str:
    """``boot1 (626f6f7431)``: the key decoded (``\\xNN`` for non-UTF-8) and in hex."""
    return f"{key.decode('utf-8', 'backslashreplace')} ({key.hex()})" if key else "(empty)"


def cookie_identity(cookie: Cookie, volumes_by_id: dict[int, Volume]) -> CookieKey:
    """``(volume key, cookie key)`` of a cookie; ``?<id>`` if its volume row is missing."""
    vol = volumes_by_id.get(cookie.volume_id)
    return (vol.key if vol else f"?{cookie.volume_id:08x}", cookie.key)


def _cache_rows(caches) -> list[tuple]:
    return [(f"{c.debug_id:08x}", c.ref, c.n_volumes, c.n_objects, c.n_accesses, c.state, c.name)
            for c in caches]


def _volume_rows(volumes) -> list[tuple]:
    return [(f"{v.debug_id:08x}", v.ref, v.n_cookies, v.n_accesses, f"{v.flags:02x}", v.cache, v.key)
            for v in volumes]


def _cookie_rows(cookies, volumes_by_id) -> list[tuple]:
    rows = []
    for c in cookies:
        vkey, _ = cookie_identity(c, volumes_by_id)
        rows.append((f"{c.debug_id:08x}", f"{c.volume_id:08x}", vkey, c.ref, c.n_active, c.n_accesses,
                     c.state, f"{c.flags:02x}", c.key.decode("utf-8", "backslashreplace"), c.key.hex(),
                     "" if c.aux is None else c.aux.hex()))
    return rows


_CACHE_HDR = ("CACHE", "REF", "VOLS", "OBJS", "ACCES", "S", "NAME")
_VOLUME_HDR = ("VOLUME", "REF", "nCOOK", "ACC", "FL", "CACHE", "KEY")
_COOKIE_HDR = ("COOKIE", "VOLUME", "VOLUME KEY", "REF", "ACT", "ACC", "S", "FL", "KEY", "KEY HEX", "AUX")


@dataclass(frozen=True)
class FscacheSnapshot:
    """One reading of caches/volumes/cookies/stats (+ a cache-dir listing when asked)."""

    caches: tuple[Cache, ...] = ()
    volumes: tuple[Volume, ...] = ()
    cookies: tuple[Cookie, ...] = ()
    stats: dict[str, dict[str, int]] | None = None  # None: no stats file (CONFIG_FSCACHE_STATS=n)
    cache_dir: CacheDirListing | None = None
    proc_root: str = procfs.DEFAULT_ROOT
    layout: str | None = None  # "6.1" / "6.12" (see procfs.proc_layout / stats_format)
    taken_at: float = field(default=0.0, compare=False)

    @classmethod
    def take(cls, proc_root: str | os.PathLike[str] = procfs.DEFAULT_ROOT,
             cache_dir: str | os.PathLike[str] | None = None) -> FscacheSnapshot:
        """Read the live files (and walk ``cache_dir``, which needs root on a real cache)."""
        root = Path(proc_root)
        stats_text = None
        try:
            stats_text = (root / "stats").read_text(encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            pass
        snap = cls.from_texts(
            caches=(root / "caches").read_text(encoding="utf-8", errors="surrogateescape"),
            volumes=(root / "volumes").read_text(encoding="utf-8", errors="surrogateescape"),
            cookies=(root / "cookies").read_text(encoding="utf-8", errors="surrogateescape"),
            stats=stats_text,
            cache_dir=CacheDirListing.scan(cache_dir) if cache_dir is not None else None,
            proc_root=str(root),
            layout=procfs.proc_layout(root),
        )
        observables.snapshot_taken(snap)
        return snap

    @classmethod
    def from_texts(cls, caches: str = "", volumes: str = "", cookies: str = "", stats: str | None = None,
                   cache_dir: CacheDirListing | None = None, proc_root: str = procfs.DEFAULT_ROOT,
                   layout: str | None = None) -> FscacheSnapshot:
        """Build a snapshot from file contents (pure; for recorded samples)."""
        return cls(
            caches=tuple(procfs.parse_caches(caches)),
            volumes=tuple(procfs.parse_volumes(volumes)),
            cookies=tuple(procfs.parse_cookies(cookies)),
            stats=None if stats is None else procfs.parse_stats(stats),
            cache_dir=cache_dir,
            proc_root=proc_root,
            layout=layout or (procfs.stats_format(stats) if stats else None),
            taken_at=time.monotonic(),
        )

    # ---------------------------------------------------------------- lookups
    @property
    def volumes_by_id(self) -> dict[int, Volume]:
        return {v.debug_id: v for v in self.volumes}

    def volume(self, key: str) -> Volume | None:
        """The (first) volume row with this key."""
        return next((v for v in self.volumes if v.key == key), None)

    def cookies_of(self, volume_key: str) -> tuple[Cookie, ...]:
        ids = {v.debug_id for v in self.volumes if v.key == volume_key}
        return tuple(c for c in self.cookies if c.volume_id in ids)

    def cookie(self, volume_key: str, key: bytes | str) -> Cookie | None:
        kb = key.encode() if isinstance(key, str) else key
        return next((c for c in self.cookies_of(volume_key) if c.key == kb), None)

    def cookie_keys(self) -> Counter:
        """Multiset of ``(volume key, cookie key bytes)``."""
        vb = self.volumes_by_id
        return Counter(cookie_identity(c, vb) for c in self.cookies)

    def stat(self, section: str, name: str) -> int | None:
        if self.stats is None:
            return None
        return self.stats.get(section, {}).get(name)

    def erofs(self) -> FscacheSnapshot:
        """This snapshot restricted to erofs volumes and their cookies (see :func:`erofs_only`)."""
        return erofs_only(self)

    def diff(self, later: FscacheSnapshot) -> SnapshotDiff:
        """What changed from this snapshot to ``later``."""
        return SnapshotDiff.between(self, later)

    # ---------------------------------------------------------------- rendering
    def render(self) -> str:
        """Tables titled like the /proc files, for assertion messages."""
        root = self.proc_root.rstrip("/")
        out = [
            f"{root}/caches\n" + tabulate(_cache_rows(self.caches), headers=_CACHE_HDR, disable_numparse=True),
            f"{root}/volumes\n" + tabulate(_volume_rows(self.volumes), headers=_VOLUME_HDR,
                                           disable_numparse=True),
            f"{root}/cookies\n" + tabulate(_cookie_rows(self.cookies, self.volumes_by_id), headers=_COOKIE_HDR,
                                           disable_numparse=True),
        ]
        if self.stats is None:
            out.append(f"{root}/stats\n(not available)")
        else:
            rows = [(sec, " ".join(f"{k}={v}" for k, v in vals.items())) for sec, vals in self.stats.items()]
            out.append(f"{root}/stats (FS-Cache block)\n" + tabulate(rows, headers=("section", "values")))
        if self.cache_dir is not None:
            out.append(self.cache_dir.render())
        return "\n\n".join(out)

    def __str__(self) -> str:
        return self.render()


def erofs_only(snapshot: FscacheSnapshot) -> FscacheSnapshot:
    """Keep volumes whose key starts with ``erofs,`` and the cookies in them.

    Caches, stats and the cache-dir listing are kept as they are (stats are global)."""
    vols = tuple(v for v in snapshot.volumes if v.key.startswith(EROFS_PREFIX))
    ids = {v.debug_id for v in vols}
    return replace(snapshot, volumes=vols, cookies=tuple(c for c in snapshot.cookies if c.volume_id in ids))


def _stats_delta(a: dict | None, b: dict | None) -> dict[str, dict[str, int]]:
    a = a or {}
    b = b or {}
    out: dict[str, dict[str, int]] = {}
    for sec in list(a) + [s for s in b if s not in a]:
        av, bv = a.get(sec, {}), b.get(sec, {})
        for k in list(av) + [k for k in bv if k not in av]:
            if (sec, k) in NON_COUNTERS:
                continue
            d = bv.get(k, 0) - av.get(k, 0)
            if d:
                out.setdefault(sec, {})[k] = d
    return out


def _multiset_diff(before: list, after: list, key):
    """Items of ``after`` not matched in ``before`` and vice versa (multiset by key)."""

    def unmatched(items: list, others: list) -> tuple:
        remaining = Counter(key(x) for x in others)
        out = []
        for x in items:
            k = key(x)
            if remaining[k]:
                remaining[k] -= 1
            else:
                out.append(x)
        return tuple(out)

    return unmatched(after, before), unmatched(before, after)


@dataclass(frozen=True)
class SnapshotDiff:
    """Differences between two snapshots: stats deltas (non-zero only), volumes and
    cookies added/removed (matched by key), cookies whose state/flags changed, and
    data files added/removed/changed when both snapshots had a cache-dir listing."""

    before: FscacheSnapshot
    after: FscacheSnapshot
    stats: dict[str, dict[str, int]]
    volumes_added: tuple[Volume, ...]
    volumes_removed: tuple[Volume, ...]
    cookies_added: tuple[Cookie, ...]
    cookies_removed: tuple[Cookie, ...]
    cookies_changed: tuple[tuple[Cookie, Cookie], ...]
    files_added: tuple[DataFile, ...] = ()
    files_removed: tuple[DataFile, ...] = ()
    files_changed: tuple[tuple[DataFile, DataFile], ...] = ()

    @classmethod
    def between(cls, before: FscacheSnapshot, after: FscacheSnapshot) -> SnapshotDiff:
        vb_before, vb_after = before.volumes_by_id, after.volumes_by_id
        vol_added, vol_removed = _multiset_diff(list(before.volumes), list(after.volumes), lambda v: v.key)
        ck_added, ck_removed = _multiset_diff(
            [(c, cookie_identity(c, vb_before)) for c in before.cookies],
            [(c, cookie_identity(c, vb_after)) for c in after.cookies],
            lambda t: t[1])
        earlier = {}
        for c in before.cookies:
            earlier.setdefault(cookie_identity(c, vb_before), c)
        changed = []
        for c in after.cookies:
            old = earlier.get(cookie_identity(c, vb_after))
            if old is not None and (old.state, old.flags, old.n_active) != (c.state, c.flags, c.n_active):
                changed.append((old, c))
        f_added: tuple = ()
        f_removed: tuple = ()
        f_changed: list = []
        if before.cache_dir is not None and after.cache_dir is not None:
            f_added, f_removed = _multiset_diff(list(before.cache_dir.files), list(after.cache_dir.files),
                                                lambda f: f.path)
            old_files = {f.path: f for f in before.cache_dir.files}
            for f in after.cache_dir.files:
                o = old_files.get(f.path)
                if o is not None and (o.size, o.allocated, o.xattr_raw) != (f.size, f.allocated, f.xattr_raw):
                    f_changed.append((o, f))
        return cls(before, after, _stats_delta(before.stats, after.stats), vol_added, vol_removed,
                   tuple(t[0] for t in ck_added), tuple(t[0] for t in ck_removed), tuple(changed),
                   f_added, f_removed, tuple(f_changed))

    def stat(self, section: str, name: str) -> int:
        """Delta of one counter (0 when unchanged)."""
        return self.stats.get(section, {}).get(name, 0)

    def added_cookie_keys(self) -> Counter:
        """Multiset of ``(volume key, cookie key text)`` of added cookies."""
        vb = self.after.volumes_by_id
        return Counter((cookie_identity(c, vb)[0], c.key_text) for c in self.cookies_added)

    def removed_cookie_keys(self) -> Counter:
        vb = self.before.volumes_by_id
        return Counter((cookie_identity(c, vb)[0], c.key_text) for c in self.cookies_removed)

    @property
    def empty(self) -> bool:
        return not (self.stats or self.volumes_added or self.volumes_removed or self.cookies_added
                    or self.cookies_removed or self.cookies_changed or self.files_added
                    or self.files_removed or self.files_changed)

    def erofs(self) -> SnapshotDiff:
        """The diff of the erofs-only views of both snapshots."""
        return SnapshotDiff.between(erofs_only(self.before), erofs_only(self.after))

    def render(self) -> str:
        """Tables of the changes, for assertion messages."""
        root = self.after.proc_root.rstrip("/")
        out = []
        if self.stats:
            rows = [(sec, k, f"{d:+d}") for sec, vals in self.stats.items() for k, d in vals.items()]
            out.append(f"{root}/stats deltas\n" + tabulate(rows, headers=("section", "counter", "delta")))
        else:
            out.append(f"{root}/stats deltas\n(no counter changed)")
        vrows = [("+",) + r for r in _volume_rows(self.volumes_added)]
        vrows += [("-",) + r for r in _volume_rows(self.volumes_removed)]
        if vrows:
            out.append(f"{root}/volumes changes\n"
                       + tabulate(vrows, headers=("",) + _VOLUME_HDR, disable_numparse=True))
        crows = [("+",) + r for r in _cookie_rows(self.cookies_added, self.after.volumes_by_id)]
        crows += [("-",) + r for r in _cookie_rows(self.cookies_removed, self.before.volumes_by_id)]
        for old, new in self.cookies_changed:
            crows += [("~was",) + _cookie_rows([old], self.before.volumes_by_id)[0],
                      ("~now",) + _cookie_rows([new], self.after.volumes_by_id)[0]]
        if crows:
            out.append(f"{root}/cookies changes\n"
                       + tabulate(crows, headers=("",) + _COOKIE_HDR, disable_numparse=True))
        frows = [("+", f.path, f.size, f.allocated) for f in self.files_added]
        frows += [("-", f.path, f.size, f.allocated) for f in self.files_removed]
        frows += [("~", n.path, f"{o.size}->{n.size}", f"{o.allocated}->{n.allocated}")
                  for o, n in self.files_changed]
        if frows:
            out.append("cache files changes\n" + tabulate(frows, headers=("", "path", "size", "alloc"),
                                                           disable_numparse=True))
        return "\n\n".join(out)

    def __str__(self) -> str:
        return self.render()
