"""The erofs domain oracle against the conflict matrix (docs/domains.md#conflicts) and properties."""

import errno
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_domains.guest.fscache.oracle import KernelBug, Oracle, volume_key_for
from erofs_domains.guest.observe.cachedir import predict_path

# A run on a 6.12.117 guest (the mounts of test_recorded_run_cache_files): the 11 cache files
# present afterwards, all equal to the prediction.
OBSERVED_612 = {
    "cache/Ierofs,img1/@83/Dimg1", "cache/Ierofs,dom/@7d/Dboot1", "cache/Ierofs,dom/@be/Dboot2",
    "cache/Ierofs,dom/@e2/DblobX", "cache/Ierofs,dom2/@8e/Dboot1", "cache/Ierofs,dom2/@3b/DblobX",
    "cache/Ierofs,img2/@ca/Dimg2", "cache/Ierofs,img3/@37/Dimg3", "cache/Ierofs,img5/@e7/Dimg5",
    "cache/Ierofs,img6/@2e/Dimg6", "cache/Ierofs,boot1/@2c/Dboot1",
}


class TestConflictMatrix:
    def test_same_fsid_twice_without_domain_is_ebusy(self):
        o = Oracle()
        assert o.mount(1, "A").ok
        r = o.mount(2, "A")
        assert (r.errno, r.errname) == (errno.EBUSY, "EBUSY")
        assert r.message == "failed to register volume for erofs,A"
        assert r.opened == ()

    def test_same_fsid_twice_in_domain_is_eexist(self):
        o = Oracle()
        assert o.mount(1, "A", "D").ok
        r = o.mount(2, "A", "D")
        assert r.errno == errno.EEXIST and r.message == "A already exists in domain D"
        assert o.expected_opens() == Counter({("erofs,D", "A"): 1})

    def test_fsid_equal_to_device_blob_of_domain_is_eexist(self):
        o = Oracle()
        assert o.mount(1, "boot1", "dom", ["blobX"]).ok
        r = o.mount(2, "blobX", "dom")
        assert r.errno == errno.EEXIST and r.message == "blobX already exists in domain dom"

    def test_same_fsid_in_two_domains(self):
        o = Oracle()
        assert o.mount(1, "A", "D1").ok and o.mount(2, "A", "D2").ok
        assert o.volumes() == {"erofs,D1", "erofs,D2"}
        assert o.cookies() == {("erofs,D1", "A"), ("erofs,D2", "A")}

    def test_fsid_equal_to_live_domain_is_ebusy(self):
        o = Oracle()
        assert o.mount(1, "boot1", "dom").ok
        assert o.mount(2, "dom").errno == errno.EBUSY

    def test_domain_equal_to_live_fsid_is_ebusy(self):
        o = Oracle()
        assert o.mount(1, "dom").ok
        r = o.mount(2, "boot1", "dom")
        assert r.errno == errno.EBUSY and r.message == "failed to register volume for erofs,dom"

    def test_device_equal_to_fsid_without_domain_is_einval(self):
        o = Oracle()
        r = o.mount(1, "A", blobs=["x", "A"])
        assert r.errno == errno.EINVAL and r.message == "failed to get cookie for A"
        # nothing stays live, but the cookies acquired before the duplicate were
        # looked up (OPEN) and relinquished by kill_sb (CLOSE, file committed)
        assert o.volumes() == set() and o.cookies() == set()
        assert r.opened == (("erofs,A", "A"), ("erofs,A", "x"))
        assert o.expected_opens() == o.expected_closes() == Counter(r.opened)
        assert o.committed_files() == o.cache_files() == {predict_path("erofs,A", "A"), predict_path("erofs,A", "x")}
        assert o.mount(2, "A", blobs=["x", "x"]).errno == errno.EINVAL

    def test_device_equal_to_fsid_in_domain_shares(self):
        o = Oracle()
        r = o.mount(1, "A", "D", ["A", "b", "b"])
        assert r.ok and r.shared == ("A", "b") and r.message == "mounted"  # its own cookies only
        assert o.shared_users("erofs,D", "A") == 2 and o.shared_users("erofs,D", "b") == 2
        assert o.expected_opens() == Counter({("erofs,D", "A"): 1, ("erofs,D", "b"): 1})

    def test_long_fsids(self):
        o = Oracle()
        assert o.mount(1, "f" * 248).ok
        assert o.mount(2, "g" * 249).errno == errno.ENOBUFS  # "I" + 255-byte key: no volume dir
        assert o.mount(3, "h" * 250).errno == errno.ENOMEM  # volume key > 255
        assert o.expected_opens() == Counter({("erofs," + "f" * 248, "f" * 248): 1})

    def test_fsid_with_slash(self):
        o = Oracle()
        r = o.mount(1, "a/b")
        assert r.errno == errno.ENOBUFS and r.opened == ()
        assert not o.expected_opens() and not o.cache_files()

    def test_cookie_key_limits_in_domain(self):
        o = Oracle()
        assert o.mount(1, "k" * 252, "d").ok
        with pytest.raises(KernelBug):
            o.mount(2, "k" * 253, "d")
        assert o.mount(3, "k" * 256, "d").errno == errno.EINVAL
        with pytest.raises(KernelBug):
            o.mount(4, "z", "d", ["b" * 255])

    def test_empty_values(self):
        o = Oracle()
        assert o.mount(1, "").errno == errno.EINVAL
        assert o.mount(2, "a", "").errno == errno.EINVAL
        r = o.mount(3, "a", None, [""])
        assert r.errno == errno.EINVAL and r.message == "Bad value for 'device'"

    def test_sysfs_name_collision_after_truncation(self):
        o = Oracle()
        prefix = "x" * 36
        assert o.mount(1, prefix + "1").ok
        r = o.mount(2, prefix + "2", blobs=["blob"])
        assert r.errno == errno.EEXIST and "duplicate filename" in r.message
        # both cookies of the failed mount were opened and released again
        assert r.opened == (("erofs," + prefix + "2", prefix + "2"), ("erofs," + prefix + "2", "blob"))
        assert o.volumes() == {"erofs," + prefix + "1"}
        # "dom," + fsid truncated the same way
        assert o.mount(3, "a" * 40, "dom").ok
        assert o.mount(4, "a" * 32 + "b", "dom").errno == errno.EEXIST
        untruncated = Oracle(sysfs_name_max=None)  # 6.1 used kasprintf(): no limit
        assert untruncated.mount(1, prefix + "1").ok and untruncated.mount(2, prefix + "2").ok

    def test_duplicate_mount_id(self):
        o = Oracle()
        o.mount(1, "a")
        with pytest.raises(ValueError):
            o.mount(1, "b")


class TestSharing:
    def test_shared_blob_opens_once(self):
        # seen on 6.12.117: the second domain mount with device=blobX opened only boot2
        o = Oracle()
        r1 = o.mount("m1", "boot1", "dom", ["blobX"])
        r2 = o.mount("m2", "boot2", "dom", ["blobX"])
        assert r1.opened == (("erofs,dom", "boot1"), ("erofs,dom", "blobX"))
        assert r2.opened == (("erofs,dom", "boot2"),) and r2.shared == ("blobX",)
        # a failed check names the rule the mount relied on
        assert r1.message == "mounted" and "blobX joins the live cookie of domain dom" in r2.message
        assert "erofs_domain_register_cookie()" in r2.message
        assert o.shared_users("erofs,dom", "blobX") == 2
        assert o.cookie_mounts("erofs,dom", "blobX") == {"m1", "m2"}
        assert o.domain_cookies("dom") == {"boot1", "blobX", "boot2"}
        assert o.volume_of("m2") == "erofs,dom"

    def test_domain_volume_lives_while_any_member_lives(self):
        o = Oracle()
        o.mount("m1", "boot1", "dom", ["blobX"])
        o.mount("m2", "boot2", "dom", ["blobX"])
        assert o.umount("m1") == (("erofs,dom", "boot1"),)  # blobX still used by m2
        assert o.volumes() == {"erofs,dom"}
        assert o.cookies() == {("erofs,dom", "boot2"), ("erofs,dom", "blobX")}
        assert o.committed_files() == {"cache/Ierofs,dom/@7d/Dboot1"}
        # boot1 is free again in the domain, and its new acquisition is a new OPEN
        assert o.mount("m3", "boot1", "dom").ok
        assert o.expected_opens()[("erofs,dom", "boot1")] == 2
        assert set(o.umount("m2")) == {("erofs,dom", "boot2"), ("erofs,dom", "blobX")}
        assert o.volumes() == {"erofs,dom"}
        o.umount("m3")
        assert o.volumes() == set() and o.cookies() == set()
        assert o.shared_users("erofs,dom", "blobX") == 0
        # the volume key is free for a non-domain mount now
        assert o.mount("m4", "dom").ok

    def test_device_sharing_another_mounts_primary(self):
        o = Oracle()
        o.mount(1, "a", "D")
        r = o.mount(2, "b", "D", ["a"])
        assert r.ok and r.shared == ("a",)
        o.umount(1)
        assert o.cookies() == {("erofs,D", "a"), ("erofs,D", "b")}
        assert o.mount(3, "a", "D").errno == errno.EEXIST  # still registered via mount 2

    def test_failed_mount_leaves_shared_refs_alone(self):
        o = Oracle()
        o.mount(1, "a", "D", ["x"])
        assert o.mount(2, "a", "D", ["x"]).errno == errno.EEXIST
        assert o.shared_users("erofs,D", "x") == 1

    def test_non_domain_blobs_are_cached_per_volume(self):
        o = Oracle()
        o.mount(1, "i1", blobs=["x"])
        o.mount(2, "i2", blobs=["x"])
        assert o.cookies() == {("erofs,i1", "i1"), ("erofs,i1", "x"), ("erofs,i2", "i2"), ("erofs,i2", "x")}

    def test_recorded_run_cache_files(self):
        # the mounts behind the 11 paths of OBSERVED_612
        o = Oracle()
        o.mount(1, "img1")
        o.mount(2, "boot1", "dom", ["blobX"])
        o.mount(3, "boot2", "dom", ["blobX"])
        o.mount(4, "boot1", "dom2", ["blobX"])
        for i, f in enumerate(("img2", "img3", "img5", "img6", "boot1"), 5):
            assert o.mount(i, f).ok
        assert o.committed_files() == frozenset()  # all still tmpfiles
        o.umount_all()
        assert o.cache_files() == o.committed_files() == OBSERVED_612

    def test_unresolvable_device_name_gets_no_open(self):
        # a device key whose cooked (base64) name exceeds NAME_MAX never reaches the daemon
        o = Oracle()
        long_blob = " " * 200
        r = o.mount(1, "a", "D", [long_blob])
        assert r.ok and r.opened == (("erofs,D", "a"),)
        assert ("erofs,D", long_blob) in o.cookies()
        o.umount(1)
        assert o.expected_closes() == Counter({("erofs,D", "a"): 1})


def test_volume_key_for():
    assert volume_key_for("f") == "erofs,f" and volume_key_for("f", "d") == "erofs,d"


# ---------------------------------------------------------------- properties

NAMES = st.sampled_from(["a", "b", "c", "d1", "d2"])
LONG = "L" * 36  # two fsids starting with it collide in sysfs


def _fsids():
    return st.one_of(NAMES, st.sampled_from([LONG + "1", LONG + "2"]))


mount_op = st.tuples(st.just("mount"), _fsids(), st.one_of(st.none(), st.sampled_from(["d1", "d2"])),
                     st.lists(NAMES, max_size=3))
umount_op = st.tuples(st.just("umount"), st.integers(min_value=0, max_value=20))
ops_strategy = st.lists(st.one_of(mount_op, umount_op), max_size=30)


def _spec_errno(live, fsid, domain, blobs):
    """Independent restatement of the rules for the generated alphabet."""
    vkey = volume_key_for(fsid, domain)
    domain_live = domain is not None and any(m[1] == domain for m in live)
    nondomain_vols = {volume_key_for(m[0]) for m in live if m[1] is None}
    taken = vkey in nondomain_vols or (domain is None and any(m[1] == fsid for m in live))
    if (domain is None or not domain_live) and taken:
        return errno.EBUSY
    if domain is not None:
        names = {n for m in live if m[1] == domain for n in (m[0], *m[2])}
        if fsid in names:
            return errno.EEXIST
    elif len({fsid, *blobs}) != 1 + len(blobs):
        return errno.EINVAL
    sysfs = (f"{domain},{fsid}" if domain else fsid)[:36]
    if any((f"{m[1]},{m[0]}" if m[1] else m[0])[:36] == sysfs for m in live):
        return errno.EEXIST
    return 0


def _check_invariants(o: Oracle, live):
    domains = {m[1] for m in live if m[1] is not None}
    expected_vols = {f"erofs,{d}" for d in domains} | {volume_key_for(m[0]) for m in live if m[1] is None}
    assert o.volumes() == expected_vols
    expected_cookies = set()
    for fsid, domain, blobs in live:
        expected_cookies |= {(volume_key_for(fsid, domain), n) for n in (fsid, *blobs)}
    assert o.cookies() == expected_cookies
    for d in domains:
        # one cookie per distinct name in the domain, refcounted by registrations
        names = [n for m in live if m[1] == d for n in (m[0], *m[2])]
        assert o.domain_cookies(d) == set(names)
        for n in set(names):
            assert o.shared_users(f"erofs,{d}", n) == names.count(n)
    opens, closes = o.expected_opens(), o.expected_closes()
    assert sum(opens.values()) - sum(closes.values()) == len(o.cookies())
    for cid in o.cookies():
        assert opens[cid] == closes[cid] + 1
    assert o.committed_files() <= o.cache_files()


@settings(max_examples=300, deadline=None)
@given(ops_strategy)
def test_random_sequences(ops):
    o = Oracle()
    live = {}  # mount id -> (fsid, domain, blobs)
    next_id = 0
    for op in ops:
        if op[0] == "mount":
            _, fsid, domain, blobs = op
            before = (o.volumes(), o.cookies())
            want = _spec_errno(list(live.values()), fsid, domain, blobs)
            r = o.mount(next_id, fsid, domain, blobs)
            assert r.errno == want, (r, live)
            if r.ok:
                live[next_id] = (fsid, domain, tuple(blobs))
            else:
                assert (o.volumes(), o.cookies()) == before
            next_id += 1
        elif live:
            mid = sorted(live)[op[1] % len(live)]
            o.umount(mid)
            del live[mid]
        _check_invariants(o, list(live.values()))
    o.umount_all()
    assert o.volumes() == set() and o.cookies() == set() and o.mounts() == set()
    assert o.expected_opens() == o.expected_closes()
    assert o.cache_files() == o.committed_files()


@given(st.lists(st.tuples(NAMES, st.lists(NAMES, max_size=3)), max_size=8))
def test_one_domain_opens_equal_distinct_names(mounts):
    """Mounting into one domain and unmounting in order: each distinct name is
    opened once as long as some mount keeps it alive."""
    o = Oracle()
    names: set[str] = set()
    for i, (fsid, blobs) in enumerate(mounts):
        r = o.mount(i, fsid, "dom", blobs)
        assert r.ok == (fsid not in names)
        if r.ok:
            names |= {fsid, *blobs}
    assert o.domain_cookies("dom") == names
    assert set(o.expected_opens()) == {("erofs,dom", n) for n in names}
    assert all(v == 1 for v in o.expected_opens().values())
    o.umount_all()
    assert o.volumes() == set()
