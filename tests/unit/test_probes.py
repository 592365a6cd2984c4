"""erofs_domains/guest/kernel_probes.py and the probe-versus-range logic of
erofs_domains/guest/kernel_features.py, on made-up kernels
and fake /proc, tracefs and fsconfig answers; no VM."""

import errno

import pytest

from erofs_domains.guest import kernel_probes as probes
from erofs_domains.guest.kernel_features import RULES, KernelFeatures, probe_verdict
from fixtures.requirements import Requirements
from tests.unit.test_kernel_rules import FSCACHE_CONFIG

TRACE = {"CONFIG_EVENT_TRACING": "y"}


def kernel(release: str, probed=None, **config) -> KernelFeatures:
    return KernelFeatures(release=release, config={**FSCACHE_CONFIG, **TRACE, **config}, has_cachefiles_dev=True,
                          probes=dict(probed or {}))


def test_agreement_is_said_and_changes_nothing():
    k = kernel("6.12.117", {"netfs_procfs": (True, "/proc/fs/fscache -> netfs")})
    assert k.holds("netfs_procfs") and not k.probe_disagrees("netfs_procfs")
    rows = dict(k.table())
    assert rows["  probe netfs_procfs"] == (
        "probed yes (/proc/fs/fscache -> netfs); the table agrees (>= 6.8)")


def test_a_probe_that_sees_a_backport_wins_and_the_table_says_so():
    """A 6.10 tree patched with `erofs: add support for FS_IOC_GETFSSYSFSPATH`: the range says no."""
    k = kernel("6.10.14", {"sysfs_path_ioctl": (True, "FS_IOC_GETFSSYSFSPATH: erofs/loop0")})
    assert k.holds("sysfs_path_ioctl") and k.probe_disagrees("sysfs_path_ioctl")
    assert dict(k.table())["  probe sysfs_path_ioctl"] == (
        "probed yes (FS_IOC_GETFSSYSFSPATH: erofs/loop0), the table says no for this version (>= 6.11): "
        "the table is wrong or the tree is patched")


def test_a_probe_that_sees_it_missing_declares_the_skip_and_names_the_disagreement():
    k = kernel("6.12.117", {"ondemand_trace": (False, "no events/cachefiles/cachefiles_ondemand_* in /t")})
    assert not k.holds("ondemand_trace") and k.declared("ondemand_trace")
    why = k.why_not("ondemand_trace")
    assert why.startswith("rule ondemand_trace: probed on kernel 6.12.117: no events/cachefiles/")
    assert "the table says yes for this version (6.1 - 7.1): the table is wrong or the tree is patched" in why
    with pytest.raises(pytest.skip.Exception):  # declared: the kernel was asked
        Requirements(k, strict=True).rule("ondemand_trace")
    assert dict(k.table())["rule ondemand_trace [6.1 - 7.1]"] == "no (declared: probed)"


def test_a_missing_option_is_still_a_failure_under_strict_whatever_the_probe():
    k = kernel("6.12.117", {"fscache_backend": (True, "fsconfig(erofs, fsid=probe): accepted")},
               CONFIG_EROFS_FS_ONDEMAND="n")
    assert not k.holds("fscache_backend") and not k.declared("fscache_backend")
    with pytest.raises(pytest.fail.Exception):
        Requirements(k, strict=True).rule("fscache_backend")


def test_verdict_words():
    rule = RULES["pagecache_share"]
    assert probe_verdict(rule, (False, "EINVAL"), (6, 12, 117)) == "probed no (EINVAL); the table agrees (>= 7.0)"
    assert probe_verdict(rule, (False, "EINVAL"), (7, 2, 13)).endswith(
        ", the table says yes for this version (>= 7.0): the table is wrong or the tree is patched")


def test_tracepoint_probe(tmp_path):
    assert probes.ondemand_tracepoints((tmp_path / "none",)) is None  # tracefs not mounted
    (tmp_path / "events" / "sched").mkdir(parents=True)
    assert probes.ondemand_tracepoints((tmp_path,))[0] is False
    (tmp_path / "events" / "cachefiles" / "cachefiles_ondemand_open").mkdir(parents=True)
    (tmp_path / "events" / "cachefiles" / "cachefiles_ondemand_read").mkdir(parents=True)
    assert probes.ondemand_tracepoints((tmp_path,)) == (
        True, f"2 events/cachefiles/cachefiles_ondemand_* in {tmp_path}")


def test_procfs_probe(tmp_path):
    assert probes.fscache_procfs(tmp_path) is None
    (tmp_path / "fs" / "netfs").mkdir(parents=True)
    (tmp_path / "fs" / "fscache").symlink_to("netfs")
    assert probes.fscache_procfs(tmp_path) == (True, f"{tmp_path}/fs/fscache -> netfs")
    (tmp_path / "fs" / "fscache").unlink()
    (tmp_path / "fs" / "fscache").mkdir()
    assert probes.fscache_procfs(tmp_path)[0] is False


@pytest.mark.parametrize(("rc", "answer"), [
    (0, (True, "fsconfig(erofs, inode_share): accepted")),
    (errno.EINVAL, (False, "fsconfig(erofs, inode_share): EINVAL (unknown parameter)")),
    (errno.EPERM, None), (None, None),
])
def test_option_probe(rc, answer):
    assert probes.option_known("inode_share", fsconfig=lambda fs, key, value: rc) == answer


def test_a_probe_that_raises_tells_nothing(monkeypatch):
    def broken(mkfs):
        raise RuntimeError("boom")
    monkeypatch.setitem(probes.PROBES, "netfs_procfs", ("x", broken))
    assert "netfs_procfs" not in probes.run_all(None, ["netfs_procfs"])
