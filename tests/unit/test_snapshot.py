"""Snapshots of /proc/fs/fscache, their diffs and rendering."""

from pathlib import Path

from erofs_domains.guest.observe.snapshot import FscacheSnapshot, erofs_only, format_key

DATA = Path(__file__).parent / "data"


def texts(layout: str, **override) -> dict:
    d = {name: (DATA / layout / name).read_text() for name in ("caches", "volumes", "cookies")}
    stats = DATA / layout / "stats"
    d["stats"] = stats.read_text() if stats.exists() else None
    d.update(override)
    return d


SNAP_612 = texts("proc-6.12")

# An earlier point of the data/proc-6.12 run, re-numbered: only boot1 and blobX were mounted and
# the volume/cookie debug ids differ (ids must not be used for matching).
BEFORE_612 = dict(
    caches=SNAP_612["caches"],
    volumes=SNAP_612["volumes"].replace("00000004     4     3", "00000009     3     2"),
    cookies="\n".join(SNAP_612["cookies"].splitlines()[:4]).replace("00000004", "00000009")
    .replace("00000005 00000009", "00000007 00000009") + "\n",
    stats=SNAP_612["stats"].replace("Cookies: n=3", "Cookies: n=2").replace("Acquire: n=5 ok=5", "Acquire: n=4 ok=4")
    .replace("at=2225", "at=100").replace("rd=11 wr=7", "rd=8 wr=5"),
)


def test_from_texts_612():
    s = FscacheSnapshot.from_texts(**SNAP_612)
    assert s.layout == "6.12"
    assert [c.name for c in s.caches] == ["mytag"]
    assert s.volume("erofs,dom").n_cookies == 3
    assert [c.key_text for c in s.cookies_of("erofs,dom")] == ["boot1", "blobX", "boot2"]
    assert s.cookie("erofs,dom", "blobX").debug_id == 5
    assert s.cookie("erofs,dom", "nope") is None
    assert s.stat("Acquire", "n") == 5 and s.stat("IO", "mis") == 0
    assert s.cookie_keys() == {("erofs,dom", b"boot1"): 1, ("erofs,dom", b"blobX"): 1, ("erofs,dom", b"boot2"): 1}


def test_render_tables_titled_like_proc_files():
    out = FscacheSnapshot.from_texts(**SNAP_612).render()
    for title in ("/proc/fs/fscache/caches", "/proc/fs/fscache/volumes", "/proc/fs/fscache/cookies",
                  "/proc/fs/fscache/stats"):
        assert title in out
    assert "boot1" in out and "626f6f7431" in out  # key decoded and hex
    assert "00000004" in out and "6134" in out
    assert str(FscacheSnapshot.from_texts(**SNAP_612)) == out


def test_render_without_stats():
    s = FscacheSnapshot.from_texts(**texts("proc-6.1-nocache"))
    assert s.stats is None and s.stat("IO", "rd") is None
    assert "(not available)" in s.render()


def test_erofs_filter():
    s = FscacheSnapshot.from_texts(**texts("proc-6.1"))
    assert s.layout == "6.1"
    e = s.erofs()
    assert [v.key for v in e.volumes] == ["erofs,img1", "erofs,dom"]
    assert [c.key_text for c in e.cookies] == ["img1", "boot1", "blobX", "boot2"]
    assert e.stats == s.stats and e.caches == s.caches
    assert erofs_only(s) == e
    assert len(s.cookies) == 5


def test_diff_matches_by_key_not_id():
    before = FscacheSnapshot.from_texts(**BEFORE_612)
    after = FscacheSnapshot.from_texts(**SNAP_612)
    d = before.diff(after)
    assert d.volumes_added == () and d.volumes_removed == ()
    assert [c.key_text for c in d.cookies_added] == ["boot2"]
    assert d.cookies_removed == ()
    assert d.added_cookie_keys() == {("erofs,dom", "boot2"): 1}
    # only counters that changed; LRU at= is a timer, not a counter
    assert d.stats == {"Cookies": {"n": 1}, "Acquire": {"n": 1, "ok": 1}, "IO": {"rd": 3, "wr": 2}}
    assert d.stat("Acquire", "n") == 1 and d.stat("Relinqs", "n") == 0
    assert not d.empty
    out = d.render()
    assert "stats deltas" in out and "+1" in out
    assert "boot2" in out and "626f6f7432" in out

    back = after.diff(before)
    assert [c.key_text for c in back.cookies_removed] == ["boot2"]
    assert back.removed_cookie_keys() == {("erofs,dom", "boot2"): 1}
    assert back.stat("IO", "rd") == -3


def test_diff_identical_is_empty():
    s = FscacheSnapshot.from_texts(**SNAP_612)
    d = s.diff(FscacheSnapshot.from_texts(**SNAP_612))
    assert d.empty and "no counter changed" in d.render()


def test_diff_volumes_and_state_changes():
    before = FscacheSnapshot.from_texts(**texts("proc-6.1"))
    after_text = texts("proc-6.1")
    after_text["volumes"] = after_text["volumes"].replace("erofs,img1", "erofs,img7")
    after_text["cookies"] = after_text["cookies"].replace(" L 4004 ", " A 6134 ")
    after = FscacheSnapshot.from_texts(**after_text)
    d = before.diff(after)
    assert [v.key for v in d.volumes_added] == ["erofs,img7"]
    assert [v.key for v in d.volumes_removed] == ["erofs,img1"]
    # the img1 cookie moved to another volume key: one removed, one added
    assert d.added_cookie_keys() == {("erofs,img7", "img1"): 1}
    assert d.removed_cookie_keys() == {("erofs,img1", "img1"): 1}
    ((old, new),) = d.cookies_changed
    assert (old.state, new.state, new.key_text) == ("L", "A", "boot2")
    assert "~was" in d.render()
    e = d.erofs()
    assert all(v.key.startswith("erofs,") for v in e.after.volumes)


def test_duplicate_keys_are_a_multiset():
    base = texts("proc-6.12")
    doubled = dict(base, cookies=base["cookies"] + "00000009 00000004   1   0   0 R 0001 626f6f7431\n")
    d = FscacheSnapshot.from_texts(**base).diff(FscacheSnapshot.from_texts(**doubled))
    assert d.added_cookie_keys() == {("erofs,dom", "boot1"): 1}


def test_orphan_cookie_volume():
    s = FscacheSnapshot.from_texts(cookies="00000002 000000aa   1   0   0 - 00 6161\n")
    assert s.cookie_keys() == {("?000000aa", b"aa"): 1}


def test_format_key():
    assert format_key(b"boot1") == "boot1 (626f6f7431)"
    assert format_key(b"") == "(empty)"


def _fake_proc(root: Path, layout: str, with_stats=True):
    root.mkdir(parents=True)
    for name in ("caches", "volumes", "cookies") + (("stats",) if with_stats else ()):
        (root / name).write_text((DATA / layout / name).read_text())


def test_take_from_fake_proc_and_cache_dir(tmp_path):
    _fake_proc(tmp_path / "netfs", "proc-6.12")
    (tmp_path / "fscache").symlink_to("netfs")
    cache = tmp_path / "cachedir"
    (cache / "cache").mkdir(parents=True)
    (cache / "graveyard").mkdir()

    before = FscacheSnapshot.take(proc_root=tmp_path / "fscache", cache_dir=cache)
    assert before.layout == "6.12" and before.proc_root == str(tmp_path / "fscache")
    assert before.cache_dir is not None and before.cache_dir.files == ()

    obj = cache / "cache/Ierofs,dom/@7d/Dboot1"
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"\0" * 4096)
    after = FscacheSnapshot.take(proc_root=tmp_path / "fscache", cache_dir=cache)
    d = before.diff(after)
    assert [f.path for f in d.files_added] == ["cache/Ierofs,dom/@7d/Dboot1"]
    assert "cache files changes" in d.render()

    obj.write_bytes(b"\0" * 8192)
    d2 = after.diff(FscacheSnapshot.take(proc_root=tmp_path / "fscache", cache_dir=cache))
    assert [n.size for _, n in d2.files_changed] == [8192]
    assert str(tmp_path / "fscache") + "/caches" in after.render()


def test_take_without_stats(tmp_path):
    _fake_proc(tmp_path / "fscache", "proc-6.1-nocache", with_stats=False)
    s = FscacheSnapshot.take(proc_root=tmp_path / "fscache")
    assert s.stats is None and s.layout == "6.1" and s.cache_dir is None
