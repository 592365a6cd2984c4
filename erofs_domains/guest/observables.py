"""Observables of the running test, collected where it runs (the VM worker, or the host in host
mode): what two kernels can differ in while both pass (tools/compare-kernels). The mount table,
the fscache snapshot and the cache-dir scan report here as they happen; the pytest plugin
(fixtures/record.py) starts a record at each test's setup and ships it with the teardown report.

Names the suite makes unique per run (erofs_domains.base.names.unique: "<prefix><pid>x<n>") are
replaced by "<prefix>#k" in order of appearance, and the cachefiles fan-out directory by "@..",
so that the same test reads the same on two kernels and in two VMs.
"""

from __future__ import annotations

import errno
import json
import re
from collections import Counter
from pathlib import Path

from erofs_domains.guest.kernel_features import CONSULTED
from erofs_domains.guest.kmsg import BAD_PATTERNS
from erofs_domains.guest.observe import procfs

# unique() names ("<prefix><pid % 1000>x<n>", the prefix may hold digits and dashes: "m3-", "c-bad-magic-"),
# also with a suffix a test appends ("x74x36d1": unique("x") + "d1")
_UNIQUE = re.compile(r"\b([A-Za-z][\w-]*?)(\d{1,3})x(\d+)")
# pointers, loop device numbers and fscache's debug ids ("O-cookie c=00000023", "V=00000010",
# fscache_print_cookie()), not blob names
_HEX = re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{16}\b|(?<=\bloop)\d+\b|(?<=\b[cV]=)[0-9a-f]{8}\b")
_FANOUT = re.compile(r"/@[0-9a-f]{2}/")
# A cache file whose key cachefiles encodes (cachefiles_cook_key(): 'E' + base64): the encoding
# of a run-unique name differs from run to run, so such names are numbered too ("E#1").
_ENCODED = re.compile(r"(?<=/@\.\./)E[\w+,-]+")
# A numbered name padded to a length ("k#1kkkk...": unique("k") filled up to 249 bytes): the
# filler's length follows the unique name's, so it is written "k#1k+"
_FILLER = re.compile(r"(#\d+)([A-Za-z])\2{3,}")
_KMSG_OURS = re.compile(r"^(erofs|CacheFiles|FS-Cache|fscache|cachefiles|netfs)\b")  # 6.12: fscache is netfs
UNSTABLE_STATS = frozenset({"LRU", "Cookies"})  # LRU timers and gauges: timing, not behaviour


class Normalizer:
    """Replaces run-unique names by `<prefix>#k`, k counted per prefix in order of appearance."""

    def __init__(self):
        self.names: dict[str, str] = {}
        self.per_prefix: Counter = Counter()

    def _name(self, m: re.Match) -> str:
        full = m.group(0)
        if full not in self.names:
            self.per_prefix[m.group(1)] += 1
            self.names[full] = f"{m.group(1)}#{self.per_prefix[m.group(1)]}"
        return self.names[full]

    def __call__(self, text: str) -> str:
        text = _FANOUT.sub("/@../", _UNIQUE.sub(self._name, text))
        return _FILLER.sub(r"\1\2+", _ENCODED.sub(self._encoded, text))

    def _encoded(self, m: re.Match) -> str:
        if m.group(0) not in self.names:
            self.per_prefix["E"] += 1
            self.names[m.group(0)] = f"E#{self.per_prefix['E']}"
        return self.names[m.group(0)]

    def observables(self, obs: dict) -> dict:
        """Keys and text values of a test's observables, in their (chronological) order."""
        return {self(k): self(v) if isinstance(v, str) else v for k, v in obs.items()}

    def kmsg(self, text: str) -> str:
        return _HEX.sub("<hex>", self(text))


# ----------------------------------------------------------------- pure summaries
def daemon_counts(requests: list[dict], norm: Normalizer) -> dict[str, str | int]:
    """OPEN/CLOSE counts and READ count and bytes per (volume, cookie), keys in log order."""
    counts: dict[tuple, list[int]] = {}
    for r in requests:
        op = r.get("op")
        if op not in ("OPEN", "READ", "CLOSE"):
            continue
        blob = f"{norm(str(r.get('volume_key')))}/{norm(str(r.get('cookie_key')))}"
        c = counts.setdefault((op, blob), [0, 0])
        c[0] += 1
        c[1] += r.get("len") or 0
    out: dict[str, str | int] = {}
    for (op, blob), (n, nbytes) in counts.items():
        out[f"daemon {op} {blob}"] = f"{n} x, {nbytes} B" if op == "READ" else n
    return out


def stats_delta(before: dict | None, after: dict | None) -> dict[str, int]:
    if not before or not after:
        return {}
    out = {}
    for sec, vals in after.items():
        if sec in UNSTABLE_STATS:
            continue
        for k, v in vals.items():
            d = v - before.get(sec, {}).get(k, 0)
            if d:
                out[f"stats {sec}.{k}"] = d
    return out


def fscache_objects(snapshot, norm: Normalizer, seen: dict) -> None:
    """Erofs volumes and cookies of a snapshot into `seen` (the largest count of each)."""
    snap = snapshot.erofs()
    vb = snap.volumes_by_id
    vols = Counter(norm(v.key) for v in snap.volumes)
    cookies = Counter(f"{norm(vb[c.volume_id].key)}/{norm(c.key_text)}" for c in snap.cookies
                      if c.volume_id in vb)
    for key, n in list(vols.items()) + [(f"cookie {k}", n) for k, n in cookies.items()]:
        key = key if key.startswith("cookie ") else f"volume {key}"
        seen[key] = max(seen.get(key, 0), n)


def cache_files(listing, norm: Normalizer) -> dict[str, str]:
    out = {}
    for f in listing.files:
        size = f.xattr.object_size if getattr(f, "xattr", None) is not None else None
        out[f"cache file {norm(f.path)}"] = f"{f.size} B" + (f", object_size {size}" if size is not None else "")
    return out


# ----------------------------------------------------------------- collection where tests run
class TestRecord:
    def __init__(self):
        self.norm = Normalizer()
        self.mounts: list[str] = []
        self.seen: dict[str, int] = {}
        self.files: dict[str, str] = {}
        self.stats_before: dict | None = None

    def observables(self, item) -> dict:
        out: dict = {f"rule {n}": "holds" if h else "does not hold" for n, h in sorted(CONSULTED.items())}
        out.update({f"mount {i}": m for i, m in enumerate(self.mounts, 1)})
        out.update(sorted(self.seen.items()))
        out.update(stats_delta(self.stats_before, read_stats()))
        out.update(self.files)
        requests = []
        funcargs = getattr(item, "funcargs", None) or {}
        d = funcargs.get("artifacts")  # the test's results directory (fixtures.plugin)
        for log in sorted(d.rglob("daemon-requests*.jsonl")) if d else ():
            for line in log.read_text(errors="replace").splitlines():
                try:
                    requests.append(json.loads(line))
                except ValueError:
                    pass
        out.update(daemon_counts(requests, self.norm))
        kmsg = funcargs.get("kmsg")
        if kmsg is not None:
            out.update(kmsg_matches(kmsg, self.norm))
        return out


def kmsg_matches(checker, norm: Normalizer) -> dict[str, int]:
    out: Counter = Counter()
    for line in checker.reader.lines:
        kinds = [k for k, rx in BAD_PATTERNS.items() if rx.search(line.text)]
        if any(rx.search(line.text) for rx in checker.expected):
            kinds.append("expected")
        if kinds or _KMSG_OURS.search(line.text):
            out[f"kmsg [{','.join(kinds) or 'log'}] {norm.kmsg(line.text)}"] += 1
    return dict(out)


def read_stats() -> dict | None:
    try:
        return procfs.parse_stats(Path("/proc/fs/fscache/stats").read_text())
    except OSError:
        return None


CURRENT: TestRecord | None = None


def mount_result(options: str, err: int) -> None:
    """Called by erofs_domains.guest.mounts for every erofs mount attempt."""
    if CURRENT is not None:
        CURRENT.mounts.append(f"{CURRENT.norm(options)} -> {errno.errorcode.get(err, err) if err else 'OK'}")


def snapshot_taken(snapshot) -> None:
    """Called by FscacheSnapshot.take."""
    if CURRENT is not None:
        fscache_objects(snapshot, CURRENT.norm, CURRENT.seen)


def cache_listing(listing) -> None:
    """Called with a test's cache directory listing once its mounts and daemon are gone."""
    if CURRENT is not None:
        CURRENT.files.update(cache_files(listing, CURRENT.norm))




def start() -> TestRecord:
    """A new record for the test being set up (what it consults and sees from now on)."""
    global CURRENT
    CURRENT = TestRecord()
    CURRENT.stats_before = read_stats()
    CONSULTED.clear()
    return CURRENT


def finish(item) -> dict:
    """The test's observables; no record is current afterwards."""
    global CURRENT
    record, CURRENT = CURRENT, None
    if record is None:
        return {}
    try:
        return record.observables(item)
    except Exception as e:  # noqa: BLE001 - a recording error must not fail the test
        return {"record error": f"{type(e).__name__}: {e}"}
