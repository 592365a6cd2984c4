"""What the running kernel can do: one table of version rules, and the one place that decides
skip versus fail.

Every expectation that differs between kernels comes from RULES below: a rule names what holds,
the kernel releases it holds in (stable releases where a change was backported: rules are keyed
by stable release, not by major version), the CONFIG option it also needs, and the kernel
function or commit behind it (docs/versions.md explains each). Tests ask
`features.holds("restore")` or `features.pick("death_read_enobufs", errno.ENOBUFS, errno.EIO)`,
or `require.rule("restore")`, which skips a test whose rule does not hold on this kernel. Under
--strict only such declared skips (the kernel's version is outside the rule's range) are allowed;
a missing CONFIG option or device still fails.
"""

import gzip
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from functools import cache

from erofs_domains.base import config, erofs_tools

# What each backend's tests cannot run without: the one list (the kernel build checks a built or
# foreign bzImage against it before the VMs start; here it names what a kernel lacks).
_GUEST_OPTIONS = ("CONFIG_EXT4_FS", "CONFIG_BLK_DEV_LOOP", "CONFIG_IKCONFIG_PROC")
REQUIRED_OPTIONS = {
    "fscache": ("CONFIG_EROFS_FS", "CONFIG_EROFS_FS_ONDEMAND", "CONFIG_FSCACHE", "CONFIG_CACHEFILES",
                "CONFIG_CACHEFILES_ONDEMAND", "CONFIG_FSCACHE_STATS") + _GUEST_OPTIONS,
    "pagecache": ("CONFIG_EROFS_FS", "CONFIG_EROFS_FS_XATTR", "CONFIG_EROFS_FS_PAGE_CACHE_SHARE",
                  "CONFIG_EROFS_FS_BACKED_BY_FILE", "CONFIG_EROFS_FS_ZIP") + _GUEST_OPTIONS,
}

# Bytes of the /sys/fs/erofs name kept where rule sysfs_name_truncated holds (below):
# super_set_sysfs_name_generic() vsnprintf()s into char s_sysfs_name[UUID_STRING_LEN + 1].
SYSFS_NAME_MAX = 36

Version = tuple[int, int, int]
PAGECACHE_OPTIONS = REQUIRED_OPTIONS["pagecache"]  # tests/pagecache (inode_share)
DIGEST_MKFS_SINCE = (1, 9, 0)  # mkfs.erofs --xattr-inode-digest appeared in erofs-utils 1.9


def parse_release(release: str) -> Version:
    """"6.1.0-32-amd64" -> (6, 1, 0); "6.12.117" -> (6, 12, 117); no sublevel counts as 0."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _v(v: Version) -> str:
    return ".".join(map(str, v[:2] if v[2] == 0 else v))


@dataclass(frozen=True)
class Span:
    """Kernel releases `since` <= v < `until` (until None: every later release)."""

    since: Version
    until: Version | None = None

    def __contains__(self, v: Version) -> bool:
        return self.since <= v and (self.until is None or v < self.until)

    def clip(self, other: "Span") -> "Span | None":
        lo = max(self.since, other.since)
        ends = [u for u in (self.until, other.until) if u is not None]
        hi = min(ends) if ends else None
        return Span(lo, hi) if hi is None or lo < hi else None

    def text(self) -> str:
        if self.until is None:
            return f">= {_v(self.since)}"
        if self.until[:2] == (self.since[0], self.since[1] + 1) and self.until[2] == 0:
            return f"{_v(self.since)}+ ({self.since[0]}.{self.since[1]}.y)"  # a stable backport
        last = (self.until[0], self.until[1] - 1, 0) if self.until[1] else None
        return f"{_v(self.since)} - {_v(last)}" if last and self.until[2] == 0 else \
            f"{_v(self.since)} - <{_v(self.until)}"


def since(*v: int) -> Span:
    return Span(tuple(v) + (0,) * (3 - len(v)))


def between(a: tuple[int, ...], b: tuple[int, ...]) -> Span:
    """a <= v < b."""
    return Span(tuple(a) + (0,) * (3 - len(a)), tuple(b) + (0,) * (3 - len(b)))


def stable(*v: int) -> Span:
    """A backport: from stable release v up to the end of its series (6.1.95 -> 6.1.95 .. 6.1.y)."""
    return Span(tuple(v), (v[0], v[1] + 1, 0))


@dataclass(frozen=True)
class Rule:
    name: str
    holds: str  # what is true on the kernels of `spans` (the README's words)
    spans: tuple[Span, ...]
    source: str  # the kernel function / commit behind it
    config: tuple[str, ...] = ()  # options it needs as well (y or m)
    otherwise: str = ""  # what is true elsewhere, if anything
    # Kernel log lines the rule decides: (a regex of the line where it holds, where it does not).
    # tools/compare-kernels explains a moved log line by them.
    log: tuple[str, str] = ()
    # Observables (fixtures/record.py keys) the rule moves in a test that asks about it: what
    # tools/compare-kernels may explain by it there.
    moves: tuple[str, ...] = ()

    def in_range(self, v: Version) -> bool:
        return any(v in s for s in self.spans)

    @property
    def doc(self) -> str | None:
        """A known bug's write-up (docs/known-bugs/), as its `holds` text names it."""
        m = re.search(r"docs/known-bugs/[\w.-]+\.md", self.holds)
        return m.group(0) if m else None

    def kernels(self, within: "Span | None" = None) -> str:
        """The releases it holds in, as text; `within` clips them (e.g. to the fscache era)."""
        spans = self.spans if within is None else [c for s in self.spans if (c := s.clip(within))]
        return ", ".join(s.text() for s in spans) or "none"


# Backports of the cachefiles failover series (restore, re-open of a closed object) and of the
# READ_COMPLETE object check, as the stable changelogs list them (Debian's linux-source-6.1
# changelog: "Update to 6.1.95", "Update to 6.1.101").
FAILOVER = (stable(6, 1, 95), stable(6, 6, 35), since(6, 8))
FSCACHE_ERA = between((6, 1), (7, 2))  # domain_id over fscache: 6.1 up to the backend's removal

RULES: dict[str, Rule] = {r.name: r for r in (
    # ---- what exists ----
    Rule("fscache_backend", "erofs mounts over fscache on-demand (`fsid=`, `domain_id=`)", (FSCACHE_ERA,),
         "fs/erofs/fscache.c; removed by `erofs: remove fscache backend entirely` (7.2, late 7.1.y)",
         ("CONFIG_EROFS_FS_ONDEMAND", "CONFIG_CACHEFILES_ONDEMAND"),
         otherwise="the fscache backend was removed in 7.2: `fsid=` is an unknown parameter, "
                   "domain_id= means page-cache sharing"),
    Rule("pagecache_share", "`-o inode_share,domain_id=D` shares the page cache of files with equal digests",
         (since(7, 0),), "fs/erofs/ishare.c (7.0); before 7.2 it also needs !CONFIG_EROFS_FS_ONDEMAND",
         ("CONFIG_EROFS_FS_PAGE_CACHE_SHARE", "CONFIG_EROFS_FS_XATTR"),
         otherwise="inode_share is an unknown parameter"),
    Rule("fscache_stats", "/proc/fs/fscache/stats exists", (FSCACHE_ERA,),
         "fscache_stats_show() (fs/fscache/stats.c; fs/netfs/fscache_stats.c from 6.8)", ("CONFIG_FSCACHE_STATS",)),
    Rule("restore", "the cachefiles `restore` command re-queues in-flight requests (failover)", FAILOVER,
         "cachefiles_ondemand_restore(), `cachefiles: add restore command to recover inflight ondemand "
         "read requests` (6.8; 6.1.95, 6.6.35)", ("CONFIG_CACHEFILES_ONDEMAND",),
         otherwise="`restore` is an unknown command (EOPNOTSUPP)"),
    Rule("reopen_closed_object", "a READ for an object whose anon fd was closed re-OPENs the object",
         FAILOVER, "cachefiles_ondemand_select_req(), `cachefiles: resend an open request if the read "
         "request's object is closed` (6.8; 6.1.95, 6.6.35)", ("CONFIG_CACHEFILES_ONDEMAND",),
         otherwise="the READ fails (EIO)"),
    Rule("read_complete_object_check", "CACHEFILES_IOC_READ_COMPLETE on another object's anon fd is refused",
         (stable(6, 1, 101), since(6, 10)), "cachefiles_ondemand_fd_ioctl(), `cachefiles: add consistency "
         "check for copen/cread` (CVE-2024-41075; 6.10, 6.1.101)", ("CONFIG_CACHEFILES_ONDEMAND",),
         otherwise="any object's msg_id is completed"),
    Rule("compressed_fscache", "compressed images are readable in fscache mode", (between((6, 9), (7, 2)),),
         "z_erofs_fscache_* / erofs_fscache_bio (6.9)", ("CONFIG_EROFS_FS_ZIP",),
         otherwise="the mount fails EOPNOTSUPP"),
    Rule("file_backed_mount", "an image file as the mount source is a file-backed mount",
         (since(6, 12),), "erofs_fileio.c, `erofs: add file-backed mount support` (6.12)",
         ("CONFIG_EROFS_FS_BACKED_BY_FILE",), otherwise="the source must be a block device (ENOTBLK)"),
    Rule("sysfs_path_ioctl", "FS_IOC_GETFSSYSFSPATH returns `erofs/<s_sysfs_name>`", (since(6, 10),),
         "super_set_sysfs_name_generic() + ioctl_get_fs_sysfs_path() (6.10)",
         otherwise="ENOTTY"),
    Rule("sysfs_name_truncated", "the /sys/fs/erofs name is cut at 36 bytes (s_sysfs_name[37])",
         (since(6, 10),), "erofs_fc_fill_super(): super_set_sysfs_name_generic(sb, \"%s,%s\") into "
         "char s_sysfs_name[UUID_STRING_LEN + 1] (6.10)",
         otherwise="erofs_register_sysfs() kasprintf()s the full `<domain_id>,<fsid>`"),
    Rule("ondemand_trace", "the cachefiles_ondemand_* tracepoints trace each OPEN, READ and CLOSE the kernel "
         "makes, with the same TP_printk fields in 6.1.192 and 6.12.117", (FSCACHE_ERA,),
         "include/trace/events/cachefiles.h, emitted in fs/cachefiles/ondemand.c (cachefiles_ondemand_get_fd(), "
         "_init_read_req(), _init_close_req(), _copen(), _fd_ioctl(), _fd_release(), _fd_write_iter())",
         ("CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EVENT_TRACING")),
    # ---- formats and log lines ----
    Rule("netfs_procfs", "/proc/fs/fscache is a link into /proc/fs/netfs; stats start "
         "`-- FS-Cache statistics --` and the IO line has `mis=`", (since(6, 8),),
         "`netfs, fscache: Move fs/fscache/* into fs/netfs/` (6.8), fscache_stats_show()",
         otherwise="/proc/fs/fscache is a directory; `FS-Cache statistics`, no `mis=`, `RdHelp` lines follow"),
    Rule("ondemand_deprecated", "an on-demand mount logs `[deprecated] fscache-based on-demand read "
         "feature in use`", (since(6, 12),), "erofs_read_superblock() (6.12: fscache mode deprecated)",
         otherwise="it logs `EXPERIMENTAL fscache-based on-demand read feature in use`",
         log=(r"\[deprecated\] fscache-based on-demand read feature in use",
              r"EXPERIMENTAL fscache-based on-demand read feature in use")),
    Rule("fscache_core_log", "fscache's log lines carry the `FS-Cache: ` prefix "
         "(`FS-Cache: Cache \"<tag>\" added (type cachefiles)`)", (between((6, 1), (6, 8)),),
         "fs/fscache/internal.h pr_fmt(), fscache_add_cache(); since the move into netfs (6.8) "
         "fs/netfs/internal.h's pr_fmt", otherwise="they carry `netfs: `", log=(r"^FS-Cache: ", r"^netfs: ")),
    Rule("fscache_read_error_log", "a read the cache cannot serve logs `erofs: erofs_fscache_read_io_async: "
         "prepare_ondemand_read failed (source N)`", (since(6, 9),),
         "erofs_fscache_read_io_async() (the fscache I/O rework for compressed images, 6.9) and 17597b1e18d2 "
         "`erofs: modify the error message when prepare_ondemand_read failed` (v6.9-rc7); 6.12.117 measured",
         otherwise="6.1.192: `erofs: (device <dev>): erofs_fscache_read_folios_async: failed to fscache "
                   "prepare_read (source N)`",
         log=(r"^erofs: erofs_fscache_read_io_async: prepare_ondemand_read failed",
              r"erofs_fscache_read_folios_async: failed to fscache prepare_read")),
    Rule("incompat_feature_log", "an image with an unknown incompatible feature logs `erofs_read_superblock: "
         "unidentified incompatible feature`", (since(6, 12),),
         "erofs_read_superblock(), `erofs: get rid of check_layout_compatibility()` (posted 2024-08; "
         "6.12.117 measured)", otherwise="`check_layout_compatibility: unidentified incompatible feature` (6.1.192)",
         log=(r"erofs_read_superblock: unidentified incompatible feature",
              r"check_layout_compatibility: unidentified incompatible feature")),
    # ---- behaviour that changed ----
    Rule("unaligned_write_refused", "an anon-fd write not starting on a page boundary fails ENOBUFS and "
         "counts in stats `IO mis=`", (since(6, 8),), "__cachefiles_prepare_write(): `start != *_start` -> "
         "fscache_count_dio_misfit(), -ENOBUFS (6.8 netfs/cachefiles rework; 6.1.192 rounds the range "
         "down and writes)", otherwise="the write succeeds (6.1.192 measured)",
         moves=(r"^stats IO\.(wr|mis)$",)),
    Rule("death_read_enobufs", "after the daemon died, every read of uncached data fails ENOBUFS, also of a "
         "folio whose readahead failed (the page cache retries it through ->read_folio)", (since(6, 8),),
         "fscache_begin_read_operation() on the withdrawn cookie (the netfs read path, 6.8)",
         otherwise="a folio of the failed readahead reads EIO, a fresh one ENOBUFS (6.1.192 measured: "
                   "SIGKILL with 3 READs held -> EIO, SIGTERM/exit with 1 -> ENOBUFS)"),
    Rule("restart_member_reads_fail", "after a daemon restart, a new domain member sharing a blob of the "
         "dead cache gets ENOBUFS for that blob's data (the blob cookie is never looked up again)",
         (since(6, 8),), "erofs_domain_register_cookie() reuses the live domain cookie; "
         "fscache_begin_read_operation() (6.8+) refuses a cookie whose cache was withdrawn",
         otherwise="reads of the shared blob fail EIO"),
    # ---- known kernel bugs (tests/host probes them in a VM of their own) ----
    Rule("bug_shared_primary_inode", "KNOWN BUG: a member whose `device=` names another member's fsid in "
         "one domain shares that member's primary cookie, whose anonymous inode lives on the other "
         "member's superblock: `VFS: Busy inodes after unmount`, then a GPF in iput() "
         "(docs/known-bugs/erofs-6.1-shared-primary-cookie.md)", (between((6, 1), (6, 3)),),
         "erofs_fscache_acquire_cookie() new_inode(sb) for EROFS_REG_COOKIE_NEED_INODE; fixed by "
         "`erofs: unify anonymous inodes for blob` (61fef98945d0, 6.3), not in 6.1.y"),
    Rule("bug_remount_inode_share", "KNOWN BUG: `mount -o remount,inode_share` of a mount made without "
         "`domain_id` turns sharing on with no domain; from 7.2.7 the next file lookup dereferences NULL "
         "in erofs_xattr_fill_inode_fingerprint() (docs/known-bugs/erofs-7.2-remount-inode-share.md)",
         (since(7, 0),), "erofs_fc_reconfigure() copies sbi->opt, INODE_SHARE included, while `domain_id is "
         "needed when inode_ishare is on` is checked only in erofs_fc_fill_super(); the oops since "
         "`erofs: delimit inode_share cache key components` (7.2.7) strlen()s the domain",
         ("CONFIG_EROFS_FS_PAGE_CACHE_SHARE",)),
    Rule("bug_cachefiles_key47", "KNOWN BUG: a 253..255-byte cookie key (an fsid in a domain) hits "
         "`kernel BUG at fs/cachefiles/key.c:47` and the mount hangs", (FSCACHE_ERA,),
         "cachefiles_cook_key(): BUG_ON(keylen > NAME_MAX - 3) while fscache allows 255"),
)}


def row_kernels(rule: str) -> str:
    """The README's "Kernels" cell of a case that needs `rule`: its releases within the fscache era."""
    return RULES[rule].kernels(within=FSCACHE_ERA)


# Rules whose test must never run in the shared VM where they hold: each is a kernel bug.
KNOWN_BUGS = tuple(n for n in RULES if n.startswith("bug_"))

# The rules asked about (name -> holds) since fixtures.record last cleared it at a test's setup:
# what the test's expectations depended on, recorded with its observables.
CONSULTED: dict[str, bool] = {}


def differing_rules(a: Version, b: Version) -> list[Rule]:
    """Rules (known bugs too) whose version range holds on one release and not the other."""
    return [r for r in RULES.values() if r.in_range(a) != r.in_range(b)]


def read_config(path: str = "/proc/config.gz") -> dict[str, str] | None:
    try:
        with gzip.open(path, "rt") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


@dataclass
class KernelFeatures:
    release: str
    config: dict[str, str] | None
    has_cachefiles_dev: bool
    mkfs_version: str | None = None  # the mkfs under test: version, path, content hash (Tools.describe)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> Version:
        return parse_release(self.release)

    def option(self, name: str) -> str:
        if self.config is None:
            return "?"
        return self.config.get(name, "n")

    def missing_options(self, options=REQUIRED_OPTIONS["fscache"]) -> list[str]:
        if self.config is None:
            return []  # unknown: decided by probing /dev/cachefiles instead
        return [o for o in options if self.option(o) not in ("y", "m")]

    # ---- the rule table ----
    def holds(self, name: str) -> bool:
        """The rule holds on this kernel: its version range and its CONFIG options."""
        return self.why_not(name) is None

    def why_not(self, name: str) -> str | None:
        reason = self._why_not(name)
        CONSULTED[name] = reason is None
        return reason

    def _why_not(self, name: str) -> str | None:
        rule = RULES[name]
        if not rule.in_range(self.version):
            return (f"rule {name} ({rule.kernels()}) does not apply to kernel {self.release}"
                    + (f": {rule.otherwise}" if rule.otherwise else ""))
        missing = [o for o in rule.config if self.option(o) not in ("y", "m", "?")]
        if missing:
            return f"rule {name}: kernel {self.release} lacks {', '.join(missing)}"
        return None

    def declared(self, name: str) -> bool:
        """True when the rule does not hold because of the kernel's version: a skip the table
        declares (allowed under --strict), not a build that lacks an option."""
        return not RULES[name].in_range(self.version)

    def pick(self, name: str, yes, no):
        """`yes` on kernels where rule `name` holds, else `no` (the rule says which is which)."""
        return yes if self.holds(name) else no

    # ---- capabilities, each with the reason it is missing (None = present) ----
    def why_no_ondemand(self) -> str | None:
        if (r := self.why_not("fscache_backend")) is not None:
            return r
        missing = self.missing_options()
        if missing:
            return f"kernel {self.release} lacks {', '.join(missing)}"
        if self.config is None and not self.has_cachefiles_dev:
            return f"kernel {self.release}: no /proc/config.gz and no /dev/cachefiles"
        if not self.has_cachefiles_dev:
            return "/dev/cachefiles does not exist (cachefiles not registered; devtmpfs not mounted?)"
        return None

    def why_no_domain(self) -> str | None:
        return self.why_no_ondemand()

    def why_no_stats(self) -> str | None:
        return self.why_not("fscache_stats")

    def why_no_restore(self) -> str | None:
        return self.why_no_ondemand() or self.why_not("restore")

    def why_no_compressed(self) -> str | None:
        return self.why_no_ondemand() or self.why_not("compressed_fscache")

    def why_no_pagecache_share(self) -> str | None:
        if (r := self.why_not("pagecache_share")) is not None:
            return r
        missing = self.missing_options(REQUIRED_OPTIONS["pagecache"])
        if missing:
            return f"kernel {self.release} lacks {', '.join(missing)}"
        return self._why_no_config("page-cache sharing")

    def why_no_pagecache_options(self) -> str | None:
        """`inode_share` and `domain_id` are parsed (7.0+), whether or not the kernel has
        CONFIG_EROFS_FS_PAGE_CACHE_SHARE: without it erofs_fc_parse_param() logs them as not
        supported and mounts without them."""
        if not RULES["pagecache_share"].in_range(self.version):
            return self.why_not("pagecache_share")
        return self._why_no_config("page-cache sharing")

    def _why_no_config(self, what: str) -> str | None:
        if self.config is None:
            return f"kernel {self.release}: no /proc/config.gz to tell whether it has {what}"
        return None

    def why_no_digest_mkfs(self) -> str | None:
        if parse_release(self.mkfs_version or "") < DIGEST_MKFS_SINCE:
            return (f"mkfs.erofs {self.mkfs_version or '(not found)'} cannot write inode digests "
                    f"(--xattr-inode-digest arrived in erofs-utils 1.9)")
        return None

    def why_no_fs_dax(self) -> str | None:
        """erofs_fc_set_dax_mode(): without CONFIG_FS_DAX every dax option fails with EINVAL."""
        if self.option("CONFIG_FS_DAX") not in ("y", "?"):
            return f"kernel {self.release} lacks CONFIG_FS_DAX (dax= is rejected before inode_share is checked)"
        return None

    def why_no_erofs_trace(self) -> str | None:
        if self.option("CONFIG_EVENT_TRACING") not in ("y", "?"):
            return f"kernel {self.release} lacks CONFIG_EVENT_TRACING (tracefs events/erofs)"
        return None

    @property
    def has_sysfs_path_ioctl(self) -> bool:
        return self.holds("sysfs_path_ioctl")

    @property
    def reopens_closed_objects(self) -> bool:
        return self.holds("reopen_closed_object")

    @property
    def sysfs_name_max(self) -> int | None:
        """Bytes of the /sys/fs/erofs name the kernel keeps (None: the whole name)."""
        return SYSFS_NAME_MAX if self.holds("sysfs_name_truncated") else None

    def table(self) -> list[tuple[str, str]]:
        def yes(reason):
            return "yes" if reason is None else f"no: {reason}"

        rows = [("kernel release", self.release)]
        shown = dict.fromkeys(REQUIRED_OPTIONS["fscache"] + ("CONFIG_EROFS_FS_ZIP",) + REQUIRED_OPTIONS["pagecache"])
        rows += [(o, self.option(o)) for o in shown]
        rows += [
            ("/dev/cachefiles", "present" if self.has_cachefiles_dev else "absent"),
            ("fscache on-demand mode", yes(self.why_no_ondemand())),
            ("domain_id (shared domain)", yes(self.why_no_domain())),
            ("page-cache sharing (inode_share)", yes(self.why_no_pagecache_share())),
        ]
        for rule in RULES.values():
            why = self._why_not(rule.name)  # not consulted by a test: not recorded
            state = "holds" if why is None else (
                "no (declared: outside its range)" if self.declared(rule.name) else f"no: {why}")
            rows.append((f"rule {rule.name} [{rule.kernels()}]", state))
        rows.append(("erofs-utils", self.mkfs_version or "not found"))
        return rows


@cache
def detect(mkfs: str | None = None) -> KernelFeatures:
    return KernelFeatures(
        release=platform.release(),
        config=read_config(),
        has_cachefiles_dev=os.path.exists("/dev/cachefiles"),
        mkfs_version=erofs_tools.Tools.beside(mkfs).describe() if mkfs else None,
    )


if __name__ == "__main__":
    import json

    f = detect(sys.argv[1] if len(sys.argv) > 1 else config.current().mkfs)
    print(json.dumps({"release": f.release, "table": f.table(), "missing": f.missing_options()}))
