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

from erofs_domains.base import config as config_module
from erofs_domains.base import erofs_tools

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


# The stable series every rule's evidence speaks for, and the 7.x series it spells out (a 7.x
# value is either one word for every one of them, or "7.0.y: VALUE; 7.1.y: VALUE; ...").
SERIES = ("6.1.y", "6.6.y", "6.12.y", "7.x.y")
SERIES_7 = ((7, 0), (7, 1), (7, 2), (7, 3))


@dataclass(frozen=True)
class Evidence:
    """Why a rule's range is what it is: the upstream commit, the mainline release it arrived in,
    the first release of each stable series that has it, and where each fact was read.

    A stable value starts with a release ("6.6.42": the first of its series with the behaviour,
    a backport), "all" (every release of the series has it), "no" (none has it) or "n/a" (the
    question does not arise there, e.g. the code is gone); words after it are notes.
    tests/unit/test_kernel_rules.py checks every value against the rule's spans."""

    commit: str  # upstream subject, and id where known ("erofs: ... (684b290abc77)")
    mainline: str  # the first mainline release with the behaviour ("6.11"), notes after it
    stable: tuple[tuple[str, str], ...]  # (series, value) for every one of SERIES
    checked: tuple[str, ...]  # where: "source 6.12.117", "Debian changelog 6.1.101", "stable mail 6.6.42"
    ended: str = ""  # the mainline release where it stops holding, and the commit ("7.2: ...")

    def series(self, name: str) -> str:
        return dict(self.stable).get(name, "")


def evidence(commit: str, mainline: str, *, s61: str, s66: str, s612: str, s7: str,
             checked: tuple[str, ...], ended: str = "") -> Evidence:
    return Evidence(commit, mainline, (("6.1.y", s61), ("6.6.y", s66), ("6.12.y", s612), ("7.x.y", s7)),
                    checked, ended)


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
    evidence: Evidence | None = None

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
# changelog: "Update to 6.1.95", "Update to 6.1.101"; the 6.6.35, 6.6.42 and 6.9.11 release mails).
# Both end where cachefiles' on-demand mode itself is gone (7.3: no fs/cachefiles/ondemand.c).
ONDEMAND_ERA_END = (7, 3)
FAILOVER = (stable(6, 1, 95), stable(6, 6, 35), between((6, 8), ONDEMAND_ERA_END))
FSCACHE_ERA = between((6, 1), (7, 2))  # domain_id over fscache: 6.1 up to the backend's removal

# Where the facts below were read (docs/versions.md#evidence says how to read them again).
SRC_61, SRC_612, SRC_72, SRC_73 = ("source 6.1.192", "source 6.12.117", "source 7.2.13", "source 7.3.4")
DEB_61 = "Debian changelog linux-source-6.1 6.1.192-3 (bookworm-security)"
DEB_612 = "Debian changelog linux-source-6.12 6.12.117-1 (its sid history: 6.6.3 - 6.11.x)"
DEB_72 = "Debian changelog linux-source-7.2 7.2.13-1 (7.1.2 - 7.2.13)"
FSCACHE_7X = "7.0.y: all; 7.1.y: all; 7.2.y: n/a (no fscache backend); 7.3.y: n/a"
ONDEMAND_7X = "7.0.y: all; 7.1.y: all; 7.2.y: all (cachefiles only: erofs cannot use it); 7.3.y: no"

RULES: dict[str, Rule] = {r.name: r for r in (
    # ---- what exists ----
    Rule("fscache_backend", "erofs mounts over fscache on-demand (`fsid=`, `domain_id=`)", (FSCACHE_ERA,),
         "fs/erofs/fscache.c; removed by `erofs: remove fscache backend entirely` (7.2)",
         ("CONFIG_EROFS_FS_ONDEMAND", "CONFIG_CACHEFILES_ONDEMAND"),
         otherwise="the fscache backend was removed in 7.2: `fsid=` is an unknown parameter, "
                   "domain_id= means page-cache sharing",
         evidence=evidence(
             "`erofs: introduce 'domain_id' mount option` (2ef164414123, the shared-domain series of 6.1-rc1)", "6.1",
             s61="all", s66="all", s612="all",
             s7="7.0.y: all; 7.1.y: all (Debian's 7.1.2, 7.1.3: no removal); 7.2.y: no; 7.3.y: no",
             ended="7.2: `erofs: remove fscache backend entirely` (c37460cd9b2f, erofs-for-7.2-rc1)",
             checked=(SRC_61 + ", " + SRC_612 + ": fs/erofs/fscache.c", SRC_72 + ", " + SRC_73 + ": no fscache.c",
                      DEB_72 + ": no removal in 7.1.y up to 7.1.3 (later 7.1.y not read)"))),
    Rule("pagecache_share", "`-o inode_share,domain_id=D` shares the page cache of files with equal digests",
         (since(7, 0),), "fs/erofs/ishare.c (7.0); before 7.2 it also needs !CONFIG_EROFS_FS_ONDEMAND",
         ("CONFIG_EROFS_FS_PAGE_CACHE_SHARE", "CONFIG_EROFS_FS_XATTR"),
         otherwise="inode_share is an unknown parameter",
         evidence=evidence(
             "the inode page cache sharing series (Hongbo Li), erofs-for-7.0-rc1 (merge 3893854000a8)", "7.0",
             s61="no", s66="no", s612="no", s7="all",
             checked=(SRC_72 + ", " + SRC_73 + ": fs/erofs/ishare.c", SRC_612 + ": no inode_share",
                      "erofs-for-7.0-rc1 pull request (linux-kernel, 2026-02)"))),
    Rule("fscache_stats", "/proc/fs/fscache/stats exists", (FSCACHE_ERA,),
         "fscache_stats_show() (fs/fscache/stats.c; fs/netfs/fscache_stats.c from 6.8)", ("CONFIG_FSCACHE_STATS",),
         evidence=evidence(
             "fscache_stats_show() (the fscache rewrite, 5.17); the range is the erofs backend's: only "
             "fscache-mode tests read the file (netfs keeps it in 7.2+ for nfs, ceph, afs)", "5.17",
             s61="all", s66="all", s612="all", s7=FSCACHE_7X,
             checked=(SRC_61 + ": fs/fscache/stats.c", SRC_612 + ", " + SRC_72 + ": fs/netfs/fscache_stats.c"))),
    Rule("restore", "the cachefiles `restore` command re-queues in-flight requests (failover)", FAILOVER,
         "cachefiles_ondemand_restore(), `cachefiles: add restore command to recover inflight ondemand "
         "read requests` (6.8; 6.1.95, 6.6.35)", ("CONFIG_CACHEFILES_ONDEMAND",),
         otherwise="`restore` is an unknown command (EOPNOTSUPP)",
         evidence=evidence(
             "`cachefiles: add restore command to recover inflight ondemand read requests` (e73fa11a356c)", "6.8",
             s61="6.1.95", s66="6.6.35", s612="all", s7=ONDEMAND_7X,
             ended="7.3: `netfs,cachefiles: sunset ondemand mode` (79c05bcda6f0; 7.3.4 has no ondemand.c)",
             checked=(DEB_61 + ": 6.1.95", "stable mail `Linux 6.6.35` (Jia Zhu's 4 failover patches)",
                      SRC_612 + ", " + SRC_72 + ": cachefiles_ondemand_restore()", SRC_73 + ": no ondemand.c"))),
    Rule("reopen_closed_object", "a READ for an object whose anon fd was closed re-OPENs the object",
         FAILOVER, "cachefiles_ondemand_select_req(), `cachefiles: resend an open request if the read "
         "request's object is closed` (6.8; 6.1.95, 6.6.35)", ("CONFIG_CACHEFILES_ONDEMAND",),
         otherwise="the READ fails (EIO)",
         evidence=evidence(
             "`cachefiles: resend an open request if the read request's object is closed` (the failover "
             "series with `restore`)", "6.8",
             s61="6.1.95", s66="6.6.35", s612="all", s7=ONDEMAND_7X,
             ended="7.3: `netfs,cachefiles: sunset ondemand mode`",
             checked=(DEB_61 + ": 6.1.95", "stable mail `Linux 6.6.35`",
                      SRC_612 + ": cachefiles_ondemand_select_req() re-opens", SRC_73 + ": no ondemand.c"))),
    Rule("read_complete_object_check", "CACHEFILES_IOC_READ_COMPLETE on another object's anon fd is refused",
         (stable(6, 1, 101), stable(6, 6, 42), stable(6, 9, 11), between((6, 10), ONDEMAND_ERA_END)),
         "cachefiles_ondemand_fd_ioctl(), `cachefiles: add consistency check for copen/cread` "
         "(CVE-2024-41075; 6.10, 6.1.101, 6.6.42, 6.9.11)", ("CONFIG_CACHEFILES_ONDEMAND",),
         otherwise="any object's msg_id is completed",
         evidence=evidence(
             "`cachefiles: add consistency check for copen/cread` (a26dc49df37e, CVE-2024-41075)", "6.10",
             s61="6.1.101", s66="6.6.42", s612="all", s7=ONDEMAND_7X,
             ended="7.3: `netfs,cachefiles: sunset ondemand mode`",
             checked=(DEB_61 + ": 6.1.101", "stable mail `Linux 6.6.42` (Baokun Li's 5 cachefiles patches)",
                      DEB_612 + ": 6.9.11", SRC_61 + ", " + SRC_612 + ": `req->object != object`"))),
    Rule("compressed_fscache", "compressed images are readable in fscache mode", (between((6, 9), (7, 2)),),
         "z_erofs_fscache_* / erofs_fscache_bio (6.9)", ("CONFIG_EROFS_FS_ZIP",),
         otherwise="the mount fails EOPNOTSUPP",
         evidence=evidence(
             "`erofs: support compressed inodes over fscache` (a1bafc3109d7, erofs-for-6.9-rc1)", "6.9",
             s61="no", s66="no", s612="all", s7=FSCACHE_7X,
             checked=(SRC_612 + ": struct erofs_fscache_bio", SRC_61 + ": none",
                      "erofs-for-6.9-rc1 pull request (tip a1bafc3109d7)"))),
    Rule("file_backed_mount", "an image file as the mount source is a file-backed mount",
         (since(6, 12),), "erofs_fileio.c, `erofs: add file-backed mount support` (6.12)",
         ("CONFIG_EROFS_FS_BACKED_BY_FILE",), otherwise="the source must be a block device (ENOTBLK)",
         evidence=evidence(
             "`erofs: add file-backed mount support` (erofs-for-6.12-rc1)", "6.12",
             s61="no", s66="no", s612="all", s7="all",
             checked=(SRC_612 + ", " + SRC_72 + ", " + SRC_73 + ": fs/erofs/fileio.c", SRC_61 + ": none",
                      "erofs-for-6.12-rc1 pull request"))),
    Rule("sysfs_path_ioctl", "FS_IOC_GETFSSYSFSPATH returns `erofs/<s_sysfs_name>`", (since(6, 11),),
         "erofs_set_sysfs_name() (super_set_sysfs_name_generic(), `erofs: add support for "
         "FS_IOC_GETFSSYSFSPATH`, 6.11) + ioctl_get_fs_sysfs_path() (6.10)",
         otherwise="ENOTTY (6.10 has the ioctl, but erofs leaves s_sysfs_name empty: fs/ioctl.c answers "
                   "ENOTTY for an empty name; 6.1 has no such ioctl)",
         evidence=evidence(
             "`erofs: add support for FS_IOC_GETFSSYSFSPATH` (684b290abc77, erofs-for-6.11-rc1-2)", "6.11",
             s61="no", s66="no (not a stable candidate: the VFS ioctl is 6.10)", s612="all",
             s7="all (7.2+: the name is s_id, super_set_sysfs_name_id(): no fscache names left)",
             checked=(SRC_612 + ": erofs_set_sysfs_name()", SRC_61 + ": no FS_IOC_GETFSSYSFSPATH in fs/ioctl.c",
                      "erofs-for-6.11-rc1-2 pull request; the v3 patch on linux-erofs (2024-07-20)"))),
    Rule("sysfs_name_truncated", "the /sys/fs/erofs name is cut at 36 bytes (s_sysfs_name[37])",
         (since(6, 12),), "erofs_register_sysfs() names the kobject after sb->s_sysfs_name, which "
         "erofs_set_sysfs_name() fills with super_set_sysfs_name_generic(sb, \"%s,%s\") into "
         "char s_sysfs_name[UUID_STRING_LEN + 1] (`erofs: clean up erofs_register_sysfs()`, 6.12)",
         otherwise="erofs_register_sysfs() kasprintf()s the full `<domain_id>,<fsid>` (6.1 - 6.11; in 6.11 "
                   "only FS_IOC_GETFSSYSFSPATH sees the cut name)",
         evidence=evidence(
             "`erofs: clean up erofs_register_sysfs()` (Gao Xiang, erofs-for-6.12-rc1; id not read from a "
             "mainline tree)", "6.12",
             s61="no", s66="no", s612="all", s7="all (7.2+: the name is s_id, at most 31 bytes)",
             checked=(SRC_612 + ": kobject_init_and_add(..., sb->s_sysfs_name)", SRC_61 + ": kasprintf()",
                      "the patch on linux-erofs (2024-08-28: `After commit 684b290abc77 ... s_sysfs_name is "
                      "now valid`); erofs-for-6.12-rc1 pull request"))),
    Rule("ondemand_trace", "the cachefiles_ondemand_* tracepoints trace each OPEN, READ and CLOSE the kernel "
         "makes, with the same TP_printk fields in 6.1.192 and 6.12.117", (FSCACHE_ERA,),
         "include/trace/events/cachefiles.h, emitted in fs/cachefiles/ondemand.c (cachefiles_ondemand_get_fd(), "
         "_init_read_req(), _init_close_req(), _copen(), _fd_ioctl(), _fd_release(), _fd_write_iter())",
         ("CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EVENT_TRACING"),
         evidence=evidence(
             "`cachefiles: add tracepoints for on-demand read mode` (1519670e4fec, the on-demand series, 5.19)", "5.19",
             s61="all", s66="all", s612="all",
             s7="7.0.y: all; 7.1.y: all; 7.2.y: n/a (still there, erofs cannot send them); 7.3.y: n/a (gone)",
             checked=(SRC_61 + ", " + SRC_612 + ", " + SRC_72 + ": 7 TRACE_EVENT(cachefiles_ondemand_*)",
                      SRC_73 + ": none"))),
    # ---- formats and log lines ----
    Rule("netfs_procfs", "/proc/fs/fscache is a link into /proc/fs/netfs; stats start "
         "`-- FS-Cache statistics --` and the IO line has `mis=`", (since(6, 8),),
         "`netfs, fscache: Move fs/fscache/* into fs/netfs/` (6.8), fscache_stats_show()",
         otherwise="/proc/fs/fscache is a directory; `FS-Cache statistics`, no `mis=`, `RdHelp` lines follow",
         evidence=evidence(
             "`netfs, fscache: Move fs/fscache/* into fs/netfs/` (David Howells; id not looked up)", "6.8",
             s61="no", s66="no", s612="all", s7="all",
             checked=(SRC_61 + ": fs/fscache/", SRC_612 + ": fs/netfs/fscache_*.c",
                      "6.1.192 and 6.12.117 guests (erofs_domains/guest/observe/procfs.py parses both)"))),
    Rule("ondemand_deprecated", "an on-demand mount logs `[deprecated] fscache-based on-demand read "
         "feature in use`", (since(6, 12),), "erofs_read_superblock() (6.12: fscache mode deprecated)",
         otherwise="it logs `EXPERIMENTAL fscache-based on-demand read feature in use`",
         log=(r"\[deprecated\] fscache-based on-demand read feature in use",
              r"EXPERIMENTAL fscache-based on-demand read feature in use"),
         evidence=evidence(
             "`erofs: mark experimental fscache backend deprecated` (erofs-for-6.12-rc1)", "6.12",
             s61="no", s66="no", s612="all", s7=FSCACHE_7X,
             checked=(SRC_61 + ": `EXPERIMENTAL fscache-based`", SRC_612 + ": `[deprecated] fscache-based`",
                      "erofs-for-6.12-rc1 pull request"))),
    Rule("fscache_core_log", "fscache's log lines carry the `FS-Cache: ` prefix "
         "(`FS-Cache: Cache \"<tag>\" added (type cachefiles)`)", (between((6, 1), (6, 8)),),
         "fs/fscache/internal.h pr_fmt(), fscache_add_cache(); since the move into netfs (6.8) "
         "fs/netfs/internal.h's pr_fmt", otherwise="they carry `netfs: `", log=(r"^FS-Cache: ", r"^netfs: "),
         evidence=evidence(
             "pr_fmt \"FS-Cache: \" of fs/fscache/internal.h, until `netfs, fscache: Move fs/fscache/* into "
             "fs/netfs/`", "5.17 (the fscache rewrite; the suite starts at 6.1)",
             s61="all", s66="all", s612="no", s7="no",
             ended="6.8: `netfs, fscache: Move fs/fscache/* into fs/netfs/`",
             checked=(SRC_61 + ": fs/fscache/internal.h", SRC_612 + ": fs/netfs/internal.h pr_fmt `netfs: `"))),
    Rule("fscache_read_error_log", "a read the cache cannot serve logs `erofs: erofs_fscache_read_io_async: "
         "prepare_ondemand_read failed (source N)`", (since(6, 9),),
         "erofs_fscache_read_io_async() (the fscache I/O rework for compressed images, 6.9) and 17597b1e18d2 "
         "`erofs: modify the error message when prepare_ondemand_read failed` (v6.9-rc7); 6.12.117 measured",
         otherwise="6.1.192: `erofs: (device <dev>): erofs_fscache_read_folios_async: failed to fscache "
                   "prepare_read (source N)`",
         log=(r"^erofs: erofs_fscache_read_io_async: prepare_ondemand_read failed",
              r"erofs_fscache_read_folios_async: failed to fscache prepare_read"),
         evidence=evidence(
             "`erofs: modify the error message when prepare_ondemand_read failed` (17597b1e18d2, v6.9-rc7) on "
             "erofs_fscache_read_io_async() (the fscache I/O rework with `erofs: support compressed inodes over "
             "fscache`, 6.9)", "6.9",
             s61="no", s66="no (the rework was not backported)", s612="all", s7=FSCACHE_7X,
             checked=(SRC_61 + ": `failed to fscache prepare_read`", SRC_612 + ": `prepare_ondemand_read failed`",
                      "6.1.192 and 6.12.117 guests (the log lines measured)"))),
    Rule("incompat_feature_log", "an image with an unknown incompatible feature logs `erofs_read_superblock: "
         "unidentified incompatible feature`", (since(6, 11),),
         "erofs_read_superblock(), `erofs: get rid of check_layout_compatibility()` (2c534624ae70, "
         "erofs-for-6.11-rc5-fixes; 6.12.117 measured)",
         otherwise="`check_layout_compatibility: unidentified incompatible feature` (6.1.192)",
         log=(r"erofs_read_superblock: unidentified incompatible feature",
              r"check_layout_compatibility: unidentified incompatible feature"),
         evidence=evidence(
             "`erofs: get rid of check_layout_compatibility()` (2c534624ae70, Hongzhen Luo)",
             "6.11 (erofs-for-6.11-rc5-fixes, not 6.12 as this rule said before)",
             s61="no", s66="no", s612="all", s7="all",
             checked=(SRC_61 + ": check_layout_compatibility()", SRC_612 + ", " + SRC_72 + ": in "
                      "erofs_read_superblock()", "erofs-for-6.11-rc5-fixes pull request (based on 6.11-rc4)",
                      DEB_612 + ": not in 6.10.y"))),
    Rule("inode_share_log_wording", "erofs_fc_fill_super() refuses `inode_share` with `domain_id is needed when "
         "inode_share is on` / `FSDAX is not allowed when inode_share is on`", (since(7, 3),),
         "erofs_fc_fill_super()'s errorfc() lines (7.3.4 source)",
         otherwise="7.0 - 7.2 word them `... when inode_ishare is on` (7.2.13 source; measured on 7.2.13)",
         log=(r"erofs: (domain_id is needed|FSDAX is not allowed) when inode_share is on",
              r"erofs: (domain_id is needed|FSDAX is not allowed) when inode_ishare is on"),
         evidence=evidence(
             "a rewording in erofs_fc_fill_super() during 7.3 (the commit is in neither Debian's changelogs nor "
             "the stored linux-erofs archive; found by the 7.3.4 run: 4 option tests failed on the old words)",
             "7.3 (7.3.4 read and run; the release candidates not read)",
             s61="n/a (no inode_share)", s66="n/a", s612="n/a",
             s7="7.0.y: no; 7.1.y: no; 7.2.y: no (7.2.13 still `inode_ishare`); 7.3.y: all",
             checked=(SRC_72 + ": `when inode_ishare is on`", SRC_73 + ": `when inode_share is on`",
                      "7.3.4 guest: tests/pagecache/test_options.py (measured)"))),
    # ---- behaviour that changed ----
    Rule("unaligned_write_refused", "an anon-fd write not starting on a page boundary fails ENOBUFS and "
         "counts in stats `IO mis=`", (since(6, 8),), "__cachefiles_prepare_write(): `start != *_start` -> "
         "fscache_count_dio_misfit(), -ENOBUFS (6.8 netfs/cachefiles rework; 6.1.192 rounds the range "
         "down and writes)", otherwise="the write succeeds (6.1.192 measured)",
         moves=(r"^stats IO\.(wr|mis)$",),
         evidence=evidence(
             "the netfs/cachefiles write rework that counts `fscache_count_dio_misfit()` in "
             "__cachefiles_prepare_write() (David Howells, netfs series for 6.8; id not looked up)",
             "6.8 (ENOBUFS for an unaligned start may be older: a pre-6.8 diff already returns it "
             "without counting; 6.1.192 rounds down and writes; not bisected)",
             s61="no", s66="no (by the 6.8 boundary; no 6.6.y tree read)", s612="all", s7=FSCACHE_7X,
             checked=(SRC_61 + ": round_down() and write", SRC_612 + ": fscache_count_dio_misfit(), -ENOBUFS",
                      "6.1.192 and 6.12.117 guests (measured)"))),
    Rule("death_read_enobufs", "after the daemon died, every read of uncached data fails ENOBUFS, also of a "
         "folio whose readahead failed (the page cache retries it through ->read_folio)", (since(6, 8),),
         "fscache_begin_read_operation() on the withdrawn cookie (the netfs read path, 6.8)",
         otherwise="a folio of the failed readahead reads EIO, a fresh one ENOBUFS (6.1.192 measured: "
                   "SIGKILL with 3 READs held -> EIO, SIGTERM/exit with 1 -> ENOBUFS)",
         evidence=evidence(
             "the netfs read path: fscache_begin_read_operation() on the withdrawn cookie, netfs retrying the "
             "folio through ->read_folio (`netfs, fscache: Move fs/fscache/* into fs/netfs/` and the 6.8 "
             "netfs read rework)", "6.8 (the boundary of the netfs move; measured only on 6.1.192 and 6.12.117)",
             s61="no", s66="no (by the 6.8 boundary; not run)", s612="all", s7=FSCACHE_7X,
             checked=("6.1.192 and 6.12.117 guests (measured)", SRC_612 + ": fs/netfs/fscache_io.c"))),
    Rule("restart_member_reads_fail", "after a daemon restart, a new domain member sharing a blob of the "
         "dead cache gets ENOBUFS for that blob's data (the blob cookie is never looked up again)",
         (since(6, 8),), "erofs_domain_register_cookie() reuses the live domain cookie; "
         "fscache_begin_read_operation() (6.8+) refuses a cookie whose cache was withdrawn",
         otherwise="reads of the shared blob fail EIO",
         evidence=evidence(
             "erofs_domain_register_cookie() (6.1, the shared-domain series) meeting "
             "fscache_begin_read_operation()'s withdrawn-cache check of the netfs read path (6.8)",
             "6.8 (the boundary of the netfs move; measured only on 6.1.192 and 6.12.117)",
             s61="no", s66="no (by the 6.8 boundary; not run)", s612="all", s7=FSCACHE_7X,
             checked=("6.1.192 (EIO) and 6.12.117 (ENOBUFS) guests (measured)",))),
    # ---- known kernel bugs (tests/host probes them in a VM of their own) ----
    Rule("bug_shared_primary_inode", "KNOWN BUG: a member whose `device=` names another member's fsid in "
         "one domain shares that member's primary cookie, whose anonymous inode lives on the other "
         "member's superblock: `VFS: Busy inodes after unmount`, then a GPF in iput() "
         "(docs/known-bugs/erofs-6.1-shared-primary-cookie.md)", (between((6, 1), (6, 3)),),
         "erofs_fscache_acquire_cookie() new_inode(sb) for EROFS_REG_COOKIE_NEED_INODE; fixed by "
         "`erofs: unify anonymous inodes for blob` (61fef98945d0, 6.3), not in 6.1.y",
         evidence=evidence(
             "the shared-domain series (`erofs: Support sharing cookies in the same domain`, 7d41963759fe, 6.1) "
             "with the primary cookie's inode on the member's superblock", "6.1",
             s61="all (6.1.184 took `erofs: maintain cookies of share domain in self-contained list`, not the fix)",
             s66="no", s612="no", s7="7.0.y: no; 7.1.y: no; 7.2.y: n/a; 7.3.y: n/a",
             ended="6.3: `erofs: unify anonymous inodes for blob` (61fef98945d0), never backported",
             checked=(DEB_61 + ": no `unify anonymous inodes` in 6.1.y", "6.1.192 guest: reproduced (tests/host)",
                      "6.12.117 guest: clean", SRC_61 + ": new_inode(sb) in erofs_fscache_acquire_cookie()"))),
    Rule("bug_remount_inode_share", "KNOWN BUG: `mount -o remount,inode_share` of a mount made without "
         "`domain_id` turns sharing on with no domain; from 7.2.7 the next file lookup dereferences NULL "
         "in erofs_xattr_fill_inode_fingerprint() (docs/known-bugs/erofs-7.2-remount-inode-share.md)",
         (since(7, 0),), "erofs_fc_reconfigure() copies sbi->opt, INODE_SHARE included, while `domain_id is "
         "needed when inode_ishare is on` is checked only in erofs_fc_fill_super(); the oops since "
         "`erofs: delimit inode_share cache key components` (7.2.7) strlen()s the domain",
         ("CONFIG_EROFS_FS_PAGE_CACHE_SHARE",),
         evidence=evidence(
             "the inode page cache sharing series (7.0); the oops from `erofs: delimit inode_share cache key "
             "components` (96bf9831fbf4 in the merge logs; 7.2.7 in stable)", "7.0",
             s61="no", s66="no", s612="no (no inode_share)",
             s7="7.0.y: all (not run); 7.1.y: all (not run); 7.2.y: all (the oops from 7.2.7); "
                "7.3.y: all (7.3.4: the same wholesale sbi->opt copy)",
             checked=(SRC_72 + ", " + SRC_73 + ": erofs_fc_reconfigure() `sbi->opt = new_sbi->opt`",
                      DEB_72 + ": `delimit inode_share cache key components` in 7.2.7",
                      "7.2.13 guest: reproduced (tests/host); a patched 7.2.13: clean"))),
    Rule("bug_cachefiles_key47", "KNOWN BUG: a 253..255-byte cookie key (an fsid in a domain) hits "
         "`kernel BUG at fs/cachefiles/key.c:47` and the mount hangs", (FSCACHE_ERA,),
         "cachefiles_cook_key(): BUG_ON(keylen > NAME_MAX - 3) while fscache allows 255",
         evidence=evidence(
             "cachefiles_cook_key()'s BUG_ON (`cachefiles: Implement key to filename encoding`, the cachefiles "
             "rewrite, 5.17); the range is erofs' fscache backend, which reaches it through an fsid", "5.17",
             s61="all", s66="all", s612="all", s7=FSCACHE_7X,
             checked=(", ".join((SRC_61, SRC_612, SRC_72, SRC_73)) + ": key.c:47 BUG_ON(keylen > NAME_MAX - 3)",
                      "6.12.117 guest: reproduced (tests/host)"))),
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
    # What the kernel answered where a rule can be probed (erofs_domains/guest/kernel_probes.py): rule -> (holds,
    # what was seen). A probe wins over the rule's range; the range stays as the cross-check.
    probes: dict[str, tuple[bool, str]] = field(default_factory=dict)

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

    def in_range(self, name: str) -> bool:
        """The rule's version condition on this kernel: the probe's answer where there is one,
        else the range."""
        if name in self.probes:
            return self.probes[name][0]
        return RULES[name].in_range(self.version)

    def probe_disagrees(self, name: str) -> bool:
        return name in self.probes and self.probes[name][0] != RULES[name].in_range(self.version)

    def _why_not(self, name: str) -> str | None:
        rule = RULES[name]
        if not self.in_range(name):
            if name in self.probes:
                return (f"rule {name}: probed on kernel {self.release}: {self.probes[name][1]}"
                        + (f": {rule.otherwise}" if rule.otherwise else "")
                        + (f" ({probe_verdict(rule, self.probes[name], self.version)})"
                           if self.probe_disagrees(name) else ""))
            return (f"rule {name} ({rule.kernels()}) does not apply to kernel {self.release}"
                    + (f": {rule.otherwise}" if rule.otherwise else ""))
        missing = [o for o in rule.config if self.option(o) not in ("y", "m", "?")]
        if missing:
            return f"rule {name}: kernel {self.release} lacks {', '.join(missing)}"
        return None

    def declared(self, name: str) -> bool:
        """True when the rule does not hold because of the kernel's version: a skip the table
        declares (allowed under --strict), not a build that lacks an option. A probe that saw the
        behaviour missing declares it too: the kernel was asked."""
        return not self.in_range(name)

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
        if not self.in_range("pagecache_share"):
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
                ("no (declared: probed)" if rule.name in self.probes else "no (declared: outside its range)")
                if self.declared(rule.name) else f"no: {why}")
            rows.append((f"rule {rule.name} [{rule.kernels()}]", state))
            if rule.name in self.probes:
                rows.append((f"  probe {rule.name}", probe_verdict(rule, self.probes[rule.name], self.version)))
        rows.append(("erofs-utils", self.mkfs_version or "not found"))
        return rows


def probe_verdict(rule: Rule, answer: tuple[bool, str], version: Version) -> str:
    """One line for the features table: what the probe saw and whether the range agrees."""
    observed, seen = answer
    table = rule.in_range(version)
    said = f"probed {'yes' if observed else 'no'} ({seen})"
    if observed == table:
        return f"{said}; the table agrees ({rule.kernels()})"
    return (f"{said}, the table says {'yes' if table else 'no'} for this version ({rule.kernels()}): "
            "the table is wrong or the tree is patched")


def probes_for(config: dict[str, str] | None, mkfs: str | None) -> dict[str, tuple[bool, str]]:
    """Run the probes; one that observes its rule's CONFIG options too runs only where the kernel
    has them (a missing option is a build problem, reported as such, never a probe's "no").
    EROFS_TEST_PROBES=0 (the run configuration's `feature_probes`) turns them off."""
    if not config_module.current().feature_probes:
        return {}
    from erofs_domains.guest import kernel_probes as probes

    def has(o):
        return config is None or config.get(o, "n") in ("y", "m")

    wanted = [n for n in probes.PROBES if n not in probes.NEEDS_CONFIG or all(has(o) for o in RULES[n].config)]
    return probes.run_all(mkfs, wanted)


@cache
def detect(mkfs: str | None = None) -> KernelFeatures:
    config = read_config()
    return KernelFeatures(
        release=platform.release(),
        config=config,
        has_cachefiles_dev=os.path.exists("/dev/cachefiles"),
        mkfs_version=erofs_tools.Tools.beside(mkfs).describe() if mkfs else None,
        probes=probes_for(config, mkfs),
    )


if __name__ == "__main__":
    import json

    f = detect(sys.argv[1] if len(sys.argv) > 1 else config_module.current().mkfs)
    print(json.dumps({"release": f.release, "table": f.table(), "missing": f.missing_options(),
                      "probes": f.probes}))
