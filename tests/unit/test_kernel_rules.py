"""erofs_domains/guest/kernel_features.py: the version rule table (ranges keyed by stable release, config
conditions, declared skips), on made-up kernels; no VM."""

import dataclasses
import re

import pytest

from erofs_domains.guest.kernel_features import (
    RULES,
    SERIES,
    SERIES_7,
    KernelFeatures,
    parse_release,
    row_kernels,
    since,
)
from fixtures.requirements import Requirements

FSCACHE_CONFIG = {o: "y" for o in ("CONFIG_EROFS_FS", "CONFIG_EROFS_FS_ONDEMAND", "CONFIG_FSCACHE",
                                   "CONFIG_CACHEFILES", "CONFIG_CACHEFILES_ONDEMAND", "CONFIG_FSCACHE_STATS",
                                   "CONFIG_EXT4_FS", "CONFIG_BLK_DEV_LOOP", "CONFIG_IKCONFIG_PROC",
                                   "CONFIG_EROFS_FS_ZIP", "CONFIG_EROFS_FS_BACKED_BY_FILE")}


def kernel(release: str, **config) -> KernelFeatures:
    return KernelFeatures(release=release, config={**FSCACHE_CONFIG, **config}, has_cachefiles_dev=True)


@pytest.mark.parametrize(("release", "expected"), [
    ("6.1.192", (6, 1, 192)), ("6.12.117", (6, 12, 117)), ("7.2", (7, 2, 0)), ("6.1.0-32-amd64", (6, 1, 0)),
])
def test_parse_release(release, expected):
    assert parse_release(release) == expected


@pytest.mark.parametrize(("release", "restore", "object_check"), [
    ("6.1.94", False, False), ("6.1.95", True, False), ("6.1.100", True, False), ("6.1.101", True, True),
    ("6.1.192", True, True), ("6.5.13", False, False), ("6.6.34", False, False), ("6.6.35", True, False),
    ("6.7.12", False, False), ("6.8.0", True, False), ("6.10.1", True, True), ("6.12.117", True, True),
])
def test_backports_are_keyed_by_stable_release(release, restore, object_check):
    k = kernel(release)
    assert k.holds("restore") is restore and k.holds("reopen_closed_object") is restore
    assert k.holds("read_complete_object_check") is object_check


def test_6_1_and_6_12_differ_where_the_issue_measured():
    old, new = kernel("6.1.192"), kernel("6.12.117")
    for rule in ("file_backed_mount", "netfs_procfs", "death_read_enobufs", "sysfs_name_truncated",
                 "unaligned_write_refused", "restart_member_reads_fail",
                 "sysfs_path_ioctl", "ondemand_deprecated", "compressed_fscache"):
        assert not old.holds(rule) and new.holds(rule), rule
    assert old.holds("bug_shared_primary_inode") and not new.holds("bug_shared_primary_inode")
    assert old.sysfs_name_max is None and new.sysfs_name_max == 36


def test_7_2_has_no_fscache_backend_and_that_is_a_declared_skip():
    k = kernel("7.2.13")
    assert k.why_no_ondemand().startswith("rule fscache_backend (6.1 - 7.1) does not apply to kernel 7.2.13")
    assert k.declared("fscache_backend") and not k.holds("bug_cachefiles_key47")
    with pytest.raises(pytest.skip.Exception):
        Requirements(k, strict=True).ondemand()


def test_page_cache_sharing_is_7_0_and_later_and_needs_its_options():
    pc = {"CONFIG_EROFS_FS_PAGE_CACHE_SHARE": "y", "CONFIG_EROFS_FS_XATTR": "y"}
    assert kernel("7.2.13", **pc).why_no_pagecache_share() is None
    without = kernel("7.2.13", **{**pc, "CONFIG_EROFS_FS_PAGE_CACHE_SHARE": "n"})
    assert "lacks CONFIG_EROFS_FS_PAGE_CACHE_SHARE" in without.why_no_pagecache_share()
    k = kernel("6.12.117")
    assert k.declared("pagecache_share") and "inode_share is an unknown parameter" in k.why_no_pagecache_share()


def test_the_remount_bug_needs_page_cache_sharing():
    pc = {"CONFIG_EROFS_FS_PAGE_CACHE_SHARE": "y", "CONFIG_EROFS_FS_XATTR": "y"}
    assert kernel("7.0.1", **pc).holds("bug_remount_inode_share")
    assert kernel("7.2.13", **pc).holds("bug_remount_inode_share")
    assert not kernel("7.2.13", **{**pc, "CONFIG_EROFS_FS_PAGE_CACHE_SHARE": "n"}).holds("bug_remount_inode_share")
    assert not kernel("6.12.117").holds("bug_remount_inode_share")


def test_a_missing_option_in_range_fails_under_strict():
    k = kernel("6.12.117", CONFIG_EROFS_FS_BACKED_BY_FILE="n")
    assert not k.holds("file_backed_mount") and not k.declared("file_backed_mount")
    assert "lacks CONFIG_EROFS_FS_BACKED_BY_FILE" in k.why_not("file_backed_mount")
    with pytest.raises(pytest.fail.Exception):
        Requirements(k, strict=True).rule("file_backed_mount")
    with pytest.raises(pytest.skip.Exception):
        Requirements(k, strict=False).rule("file_backed_mount")
    with pytest.raises(pytest.skip.Exception, match="rule file_backed_mount .* does not apply to kernel 6.1.192"):
        Requirements(kernel("6.1.192"), strict=True).rule("file_backed_mount")


def test_known_bug_skips_only_where_the_bug_is():
    with pytest.raises(pytest.skip.Exception, match="known kernel bug on 6.1.192 .*bug_shared_primary_inode"):
        Requirements(kernel("6.1.192"), strict=True).not_bug("bug_shared_primary_inode")
    Requirements(kernel("6.12.117"), strict=True).not_bug("bug_shared_primary_inode")  # no skip


def test_pick_chooses_by_the_rule():
    assert kernel("6.12.117").pick("death_read_enobufs", "ENOBUFS", "EIO") == "ENOBUFS"
    assert kernel("6.1.192").pick("death_read_enobufs", "ENOBUFS", "EIO") == "EIO"


def test_readme_kernels_are_real_ranges():
    assert row_kernels("fscache_backend") == "6.1 - 7.1"
    assert row_kernels("restore") == "6.1.95+ (6.1.y), 6.6.35+ (6.6.y), 6.8 - 7.1"
    assert row_kernels("read_complete_object_check") == "6.1.101+ (6.1.y), 6.6.42+ (6.6.y), 6.9.11+ (6.9.y), 6.10 - 7.1"
    assert row_kernels("file_backed_mount") == "6.12 - 7.1"
    assert RULES["bug_shared_primary_inode"].kernels() == "6.1 - 6.2"


def test_every_rule_says_where_it_comes_from():
    for rule in RULES.values():
        assert rule.spans and rule.source and rule.holds, rule.name


def test_features_table_names_every_rule():
    rows = dict(kernel("6.1.192").table())
    assert rows["kernel release"] == "6.1.192"
    assert rows["rule restore [6.1.95+ (6.1.y), 6.6.35+ (6.6.y), 6.8 - 7.2]"] == "holds"
    assert rows["rule file_backed_mount [>= 6.12]"] == "no (declared: outside its range)"


# ---- evidence: every rule says where its range comes from, and the range agrees with it ----

def _series_values(rule) -> list[tuple[tuple[int, int], str]]:
    """(series, value) pairs of a rule's evidence, the 7.x entry spelt out per 7.N series."""
    out = []
    for series in SERIES:
        value = rule.evidence.series(series)
        if series != "7.x.y":
            major, minor = (int(x) for x in series.split(".")[:2])
            out.append(((major, minor), value))
            continue
        parts = dict(p.strip().split(": ", 1) for p in value.split(";")) if value[:2] == "7." else None
        for major, minor in SERIES_7:
            out.append(((major, minor), parts[f"{major}.{minor}.y"] if parts else value))
    return out


def evidence_disagreements(rule) -> list[str]:
    """What the rule's spans say differently from its evidence (empty: they agree)."""
    bad = []
    for (major, minor), value in _series_values(rule):
        word = value.split(" ", 1)[0].rstrip(",;")
        first, last = (major, minor, 0), (major, minor, 999)
        if word == "all" and not (rule.in_range(first) and rule.in_range(last)):
            bad.append(f"{major}.{minor}.y: evidence says every release, the range says {rule.kernels()}")
        elif word == "no" and (rule.in_range(first) or rule.in_range(last)):
            bad.append(f"{major}.{minor}.y: evidence says no release, the range says {rule.kernels()}")
        elif re.fullmatch(r"\d+\.\d+\.\d+", word):
            v = parse_release(word)
            if v[:2] != (major, minor):
                bad.append(f"{major}.{minor}.y: {word} is not a release of that series")
            elif not rule.in_range(v) or rule.in_range((major, minor, v[2] - 1)):
                bad.append(f"{major}.{minor}.y: evidence says from {word}, the range says {rule.kernels()}")
        elif word not in ("all", "no", "n/a") and not re.fullmatch(r"\d+\.\d+\.\d+", word):
            bad.append(f"{major}.{minor}.y: {value!r} starts with none of a release, all, no, n/a")
    mainline = parse_release(rule.evidence.mainline.split(" ", 1)[0])
    if mainline >= (6, 1, 0):  # the suite's kernels start at 6.1: an older mainline says "all of them"
        if not rule.in_range(mainline):
            bad.append(f"mainline {rule.evidence.mainline}: not in the range {rule.kernels()}")
        if mainline[1] and rule.in_range((mainline[0], mainline[1] - 1, 0)):
            bad.append(f"mainline {rule.evidence.mainline}: the range {rule.kernels()} starts earlier")
    if rule.evidence.ended:
        end = parse_release(rule.evidence.ended.split(":", 1)[0])
        if rule.in_range(end) or (end[1] and not rule.in_range((end[0], end[1] - 1, 999))):
            bad.append(f"ended {rule.evidence.ended}: the range {rule.kernels()} does not end there")
    return bad


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_has_evidence(name):
    rule = RULES[name]
    ev = rule.evidence
    assert ev is not None, (f"rule {name} has no evidence: name the upstream commit, the mainline release, "
                            f"the first release of each of {', '.join(SERIES)} and where each was checked")
    missing = [s for s in SERIES if not ev.series(s).strip()]
    assert ev.commit and ev.mainline and ev.checked and not missing, (
        f"rule {name}: evidence incomplete (commit {ev.commit!r}, mainline {ev.mainline!r}, "
        f"checked {ev.checked!r}, series without a value: {missing})")


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_range_agrees_with_its_evidence(name):
    bad = evidence_disagreements(RULES[name])
    assert not bad, f"rule {name}: its range and its evidence disagree: " + "; ".join(bad)


def test_a_wrong_range_is_caught_by_its_evidence():
    """The check above fails a rule whose range lost a backport its evidence names (the mistake
    issue 18 found in read_complete_object_check)."""
    rule = RULES["read_complete_object_check"]
    wrong = dataclasses.replace(rule, spans=(rule.spans[0], rule.spans[-1]))  # 6.6.42 and 6.9.11 dropped
    assert evidence_disagreements(wrong) == [
        "6.6.y: evidence says from 6.6.42, the range says 6.1.101+ (6.1.y), 6.10 - 7.2"]
    early = dataclasses.replace(RULES["sysfs_path_ioctl"], spans=(since(6, 10),))  # the old, wrong range
    assert evidence_disagreements(early) == ["mainline 6.11: the range >= 6.10 starts earlier"]


@pytest.mark.parametrize(("release", "ioctl", "truncated", "incompat_log"), [
    ("6.10.14", False, False, False), ("6.11.0", True, False, True), ("6.11.11", True, False, True),
    ("6.12.0", True, True, True), ("6.12.117", True, True, True), ("6.1.192", False, False, False),
])
def test_sysfs_rules_follow_the_commits(release, ioctl, truncated, incompat_log):
    k = kernel(release)
    assert k.holds("sysfs_path_ioctl") is ioctl
    assert k.holds("sysfs_name_truncated") is truncated
    assert k.holds("incompat_feature_log") is incompat_log


@pytest.mark.parametrize(("release", "holds"), [
    ("6.6.41", False), ("6.6.42", True), ("6.9.10", False), ("6.9.11", True), ("6.7.12", False),
])
def test_read_complete_check_backports(release, holds):
    assert kernel(release).holds("read_complete_object_check") is holds
