"""Cache-directory path prediction (fscache hash, cachefiles key cooking) and listing."""

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs_domains.guest.observe.cachedir import (
    CACHE_XATTR,
    KEY_MAX,
    CacheDirListing,
    CacheXattr,
    cook_key,
    cookie_hash,
    decode_cache_xattr,
    fanout_dir,
    fscache_hash,
    predict_path,
    volume_dir_name,
    volume_hash,
)

# Computed with a C transliteration of fscache_hash() and cachefiles_cook_key() (the algorithm in
# docs/observables.md#the-fscache-hash); one example for each name encoding (D, E, S).
WORKED_EXAMPLES = [
    ("erofs,mydomain", "blob1", "cache/Ierofs,mydomain/@2a/Dblob1"),
    ("erofs,mydomain", "blob2", "cache/Ierofs,mydomain/@5b/Dblob2"),
    ("erofs,mydomain", "fsid1", "cache/Ierofs,mydomain/@96/Dfsid1"),
    ("erofs,fsid1", "fsid1", "cache/Ierofs,fsid1/@3b/Dfsid1"),
    ("erofs,img", "/path/with/slash", "cache/Ierofs,img/@61/E2L0noQxSbTB6tEZOsI5SsE100"),
    ("erofs,x", b"\x00\x00\x00\x01", "cache/Ierofs,x/@fd/S1"),
]

# Paths observed on a 6.12.117 guest after umount + CLOSE (the run of test_oracle.OBSERVED_612).
OBSERVED_612 = [
    ("erofs,img1", "img1", "cache/Ierofs,img1/@83/Dimg1"),
    ("erofs,dom", "boot1", "cache/Ierofs,dom/@7d/Dboot1"),
    ("erofs,dom", "boot2", "cache/Ierofs,dom/@be/Dboot2"),
    ("erofs,dom", "blobX", "cache/Ierofs,dom/@e2/DblobX"),
    ("erofs,dom2", "boot1", "cache/Ierofs,dom2/@8e/Dboot1"),
    ("erofs,dom2", "blobX", "cache/Ierofs,dom2/@3b/DblobX"),
    ("erofs,img2", "img2", "cache/Ierofs,img2/@ca/Dimg2"),
    ("erofs,img3", "img3", "cache/Ierofs,img3/@37/Dimg3"),
    ("erofs,img5", "img5", "cache/Ierofs,img5/@e7/Dimg5"),
    ("erofs,img6", "img6", "cache/Ierofs,img6/@2e/Dimg6"),
    ("erofs,boot1", "boot1", "cache/Ierofs,boot1/@2c/Dboot1"),
]


@pytest.mark.parametrize("volume,cookie,path", WORKED_EXAMPLES + OBSERVED_612)
def test_predict_path(volume, cookie, path):
    assert predict_path(volume, cookie) == path


def test_hashes_of_worked_example():
    vh = volume_hash("erofs,mydomain")
    assert vh == 0xA0ED89DE
    assert cookie_hash(vh, "blob1") == 0x2538F72A
    assert fanout_dir("erofs,mydomain", b"blob1") == "@2a"


def test_fscache_hash_needs_words():
    with pytest.raises(ValueError):
        fscache_hash(0, b"abc")
    assert fscache_hash(0, b"") == 0  # fold_hash(0, 0)


def test_volume_key_limit():
    volume_hash("x" * 255)
    with pytest.raises(ValueError):
        volume_hash("x" * 256)


def test_volume_dir_is_raw():
    assert volume_dir_name("erofs,a b") == "Ierofs,a b"


class TestCookKey:
    @pytest.mark.parametrize("key,name", [
        (b"img1", "Dimg1"),
        (b"!.0~\x7f", "D!.0~\x7f"),          # 0x21..0x2e and 0x30..0x7f are printable
        (b"\x00\x00\x00\x01", "S1"),          # big-endian words, zero words print empty
        (b"\x01\x00\x00\x00", "T1"),          # little-endian when shorter
        (b"\x00\x00\x00\x00\x00\x00\x00\x02", "S,2"),
        (b"\0\0\0 ", "S20"),                # blank is not printable
        (b"a b", "E0x1yo"),                   # hex words would be longer than base64
        (b"/path/with/slash", "E2L0noQxSbTB6tEZOsI5SsE100"),
    ])
    def test_examples(self, key, name):
        assert cook_key(key) == name

    def test_base64_padding_digit(self):
        assert cook_key(bytes(range(0x80, 0x80 + 9))).startswith("E0")
        assert cook_key(bytes(range(0x80, 0x80 + 8))).startswith("E1")
        assert cook_key(bytes(range(0x80, 0x80 + 7))).startswith("E2")

    def test_length_limit(self):
        assert cook_key("k" * KEY_MAX) == "D" + "k" * KEY_MAX
        with pytest.raises(ValueError, match="BUG_ON"):
            cook_key("k" * (KEY_MAX + 1))

    @given(st.binary(max_size=KEY_MAX))
    def test_encoding_is_reversible(self, key):
        name = cook_key(key)
        assert "/" not in name and "\0" not in name
        kind, body = name[0], name[1:]
        padded = key + b"\0" * (-len(key) % 4)
        if kind == "D":
            assert body.encode("latin-1") == key
        elif kind in "ST":
            fmt = ">I" if kind == "S" else "<I"
            words = [int(w, 16) if w else 0 for w in body.split(",")]
            assert b"".join(struct.pack(fmt, w) for w in words) == padded
        else:
            assert kind == "E"
            charmap = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-"
            pad, chars = int(body[0]), body[1:]
            out = b""
            for i in range(0, len(chars), 4):
                acc = sum(charmap.index(ch) << (6 * j) for j, ch in enumerate(chars[i:i + 4]))
                out += acc.to_bytes(3, "little")
            assert out[:len(out) - pad] == key

    # Drawn from the printable set itself: filtering random bytes rejects most of them, and
    # Hypothesis' filter_too_much health check then fails the test now and then.
    @given(st.lists(st.sampled_from([c for c in range(33, 128) if c != 47]), min_size=1, max_size=64).map(bytes))
    def test_printable_keys_are_direct(self, key):
        assert cook_key(key) == "D" + key.decode("ascii")


XATTR_IMG1 = bytes.fromhex("00000000 00004000 00000000 00000000 01 00".replace(" ", ""))


def test_decode_xattr_reference_value():
    x = decode_cache_xattr(XATTR_IMG1)
    assert x == CacheXattr(object_size=16384, zero_point=0, type=1, content=0)
    assert (x.type_name, x.content_name) == ("DATA", "NO_DATA")
    assert decode_cache_xattr(XATTR_IMG1 + b"aux").aux == b"aux"
    with pytest.raises(ValueError):
        decode_cache_xattr(XATTR_IMG1[:17])


def _make_cache(root):
    """A fake cache dir laid out like cachefiles does, with two committed objects."""
    paths = [p for _, _, p in OBSERVED_612[:4]]
    for p in paths:
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "wb") as fh:
            fh.truncate(16384)
    # one fan-out dir without objects, as after volume acquisition (@00..@ff)
    (root / "cache/Ierofs,dom/@00").mkdir()
    (root / "graveyard").mkdir()
    (root / "graveyard/1234.5").write_bytes(b"x")
    return paths


def _xattrs_supported(path) -> bool:
    try:
        os.setxattr(path, "user.test", b"1")
        return True
    except OSError:
        return False


class TestListing:
    def test_scan_and_compare(self, tmp_path):
        paths = _make_cache(tmp_path)
        first = tmp_path / paths[0]
        with open(first, "r+b") as fh:
            fh.write(b"\xaa" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        listing = CacheDirListing.scan(tmp_path)
        assert listing.paths() == frozenset(paths)
        f = listing.file(paths[0])
        assert (f.size, f.volume_key, f.name) == (16384, "erofs,img1", "Dimg1")
        assert f.allocated >= 4096
        assert listing.file(paths[1]).allocated == 0  # sparse
        assert {v.key: v.n_files for v in listing.volumes} == {"erofs,dom": 3, "erofs,img1": 1}
        assert [(g.name, g.is_dir) for g in listing.graveyard] == [("1234.5", False)]
        assert listing.stray == ()

        cmp = listing.expected_vs_actual(paths)
        assert cmp.ok and cmp.matched == frozenset(paths)
        cmp = listing.expected_vs_actual(paths[1:] + ["cache/Ierofs,x/@fd/S1"])
        assert not cmp.ok
        assert cmp.missing == {"cache/Ierofs,x/@fd/S1"} and cmp.unexpected == {paths[0]}
        assert "MISSING" in cmp.render() and "UNEXPECTED" in cmp.render()
        assert paths[0] in listing.render()

    def test_xattrs(self, tmp_path):
        paths = _make_cache(tmp_path)
        if not _xattrs_supported(tmp_path / paths[0]):
            pytest.skip("no user xattrs on the test filesystem")
        os.setxattr(tmp_path / paths[0], CACHE_XATTR, XATTR_IMG1)
        os.setxattr(tmp_path / paths[1], CACHE_XATTR, b"short")
        os.setxattr(tmp_path / "cache/Ierofs,dom", CACHE_XATTR, b"\0\0\0\0")
        listing = CacheDirListing.scan(tmp_path)
        good, bad = listing.file(paths[0]), listing.file(paths[1])
        assert good.xattr == CacheXattr(16384, 0, 1, 0) and good.xattr_raw == XATTR_IMG1
        assert bad.xattr is None and "18" in bad.xattr_error
        assert listing.file(paths[2]).xattr is None and listing.file(paths[2]).xattr_error is None
        dom = next(v for v in listing.volumes if v.key == "erofs,dom")
        assert dom.xattr_raw == b"\0\0\0\0"
        assert "NO_DATA" in listing.render()

    def test_stray_entries(self, tmp_path):
        _make_cache(tmp_path)
        (tmp_path / "cache/junk").write_text("")
        (tmp_path / "cache/Ierofs,img1/notafanout").write_text("")
        (tmp_path / "cache/Ierofs,img1/@83/subdir").mkdir()
        (tmp_path / "other").mkdir()
        listing = CacheDirListing.scan(tmp_path)
        assert set(listing.stray) == {"cache/junk", "cache/Ierofs,img1/notafanout",
                                      "cache/Ierofs,img1/@83/subdir", "other"}

    def test_empty_root(self, tmp_path):
        listing = CacheDirListing.scan(tmp_path)
        assert listing.files == () and listing.expected_vs_actual([]).ok


def test_scan_of_some_volumes_only(tmp_path):
    for vol, cookie in (("erofs,a", "x"), ("erofs,b", "y")):
        f = tmp_path / predict_path(vol, cookie)
        f.parent.mkdir(parents=True)
        f.write_bytes(b"d")
    (tmp_path / "graveyard").mkdir()
    (tmp_path / "graveyard" / "old").write_bytes(b"")
    some = CacheDirListing.scan(tmp_path, volume_keys=["erofs,a", "erofs,missing"])
    assert some.paths() == {predict_path("erofs,a", "x")}
    assert [g.name for g in some.graveyard] == ["old"]
    assert CacheDirListing.scan(tmp_path).paths() == {predict_path("erofs,a", "x"), predict_path("erofs,b", "y")}
