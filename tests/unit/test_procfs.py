"""Parsers of /proc/fs/fscache/* against recorded (6.12) and constructed (6.1) samples."""

from pathlib import Path

import pytest

from erofs_domains.guest.observe import procfs
from erofs_domains.guest.observe.procfs import (
    Cache,
    Cookie,
    ProcParseError,
    Volume,
    parse_caches,
    parse_cookies,
    parse_stats,
    parse_volumes,
    stats_format,
)

DATA = Path(__file__).parent / "data"


def sample(layout: str, name: str) -> str:
    return (DATA / layout / name).read_text()


# The FS-Cache block of data/proc-6.12/stats (6.12.117 guest, see data/README.md).
STATS_612 = {
    "Cookies": {"n": 3, "v": 1, "vcol": 0, "voom": 0},
    "Acquire": {"n": 5, "ok": 5, "oom": 0},
    "LRU": {"n": 0, "exp": 0, "rmv": 0, "drp": 2, "at": 2225},
    "Invals": {"n": 0},
    "Updates": {"n": 0, "rsz": 0, "rsn": 0},
    "Relinqs": {"n": 2, "rtr": 0, "drop": 2},
    "NoSpace": {"nwr": 0, "ncr": 0, "cull": 0},
    "IO": {"rd": 11, "wr": 7, "mis": 0},
}


class TestSamples612:
    """Recorded on 6.12.117, see data/README.md."""

    def test_caches(self):
        assert parse_caches(sample("proc-6.12", "caches")) == [Cache(1, 2, 1, 3, 1, "A", "mytag")]

    def test_volumes(self):
        assert parse_volumes(sample("proc-6.12", "volumes")) == [Volume(4, 4, 3, 1, 0, "mytag", "erofs,dom")]

    def test_cookies(self):
        cookies = parse_cookies(sample("proc-6.12", "cookies"))
        assert [c.key_text for c in cookies] == ["boot1", "blobX", "boot2"]
        assert cookies[0] == Cookie(4, 4, 2, 1, 0, "A", 0x6134, b"boot1", None)
        assert {c.volume_id for c in cookies} == {4}
        # FL 6134 decoded with the FSCACHE_COOKIE_* bit numbers (include/linux/fscache.h)
        assert cookies[1].flag_names == (
            "IS_CACHING", "NEEDS_UPDATE", "HAS_BEEN_CACHED", "NO_ACCESS_WAKE", "HAVE_DATA", "IS_HASHED")
        assert cookies[2].state_name == "ACTIVE"

    def test_stats(self):
        text = sample("proc-6.12", "stats")
        assert stats_format(text) == "6.12"
        assert parse_stats(text) == STATS_612

    def test_stats_netfs_lines_first_are_ignored(self):
        text = sample("proc-6.12", "stats-with-netfs")
        assert stats_format(text) == "6.12"
        assert parse_stats(text) == STATS_612


class TestSamples61:
    """Constructed from the 6.1 seq_printf() formats of fs/fscache/{cache,volume,cookie,stats}.c
    and fs/netfs/stats.c (not recorded on a 6.1 kernel), see data/README.md."""

    def test_caches_long_name(self):
        assert parse_caches(sample("proc-6.1", "caches")) == [Cache(1, 4, 3, 5, 1, "A", "CacheFiles-test-tag1")]

    def test_volumes_truncated_cache_name_and_flags(self):
        vols = parse_volumes(sample("proc-6.1", "volumes"))
        assert [v.key for v in vols] == ["erofs,img1", "erofs,dom", "afs,example.com,20000001"]
        assert {v.cache for v in vols} == {"CacheFiles-test"}  # %-15.15s
        assert vols[2].flags == 0x10 and vols[2].flag_names == ("CREATING",)

    def test_cookies_trailing_blank_header_aux_and_states(self):
        cookies = parse_cookies(sample("proc-6.1", "cookies"))
        assert [c.debug_id for c in cookies] == [2, 3, 4, 5, 6]
        assert [c.key_text for c in cookies[:4]] == ["img1", "boot1", "blobX", "boot2"]
        assert cookies[3].state == "L" and cookies[3].flags == 0x4004
        afs = cookies[4]
        assert afs.key == bytes.fromhex("0100000002000000a3000000")
        assert afs.aux == bytes.fromhex("0700000000000000")
        assert afs.state_name == "QUIESCENT"
        assert all(c.aux is None for c in cookies[:4])

    def test_stats_without_mis_and_netfs_after(self):
        text = sample("proc-6.1", "stats")
        assert stats_format(text) == "6.1"
        stats = parse_stats(text)
        assert list(stats) == ["Cookies", "Acquire", "LRU", "Invals", "Updates", "Relinqs", "NoSpace", "IO"]
        assert stats["IO"] == {"rd": 9, "wr": 6}
        assert stats["Acquire"] == {"n": 6, "ok": 6, "oom": 0}
        assert "RdHelp" not in stats

    def test_unbound_placeholder_cache(self):
        (cache,) = parse_caches(sample("proc-6.1-nocache", "caches"))
        assert (cache.name, cache.state, cache.state_name) == ("-", "-", "NOT_PRESENT")
        (vol,) = parse_volumes(sample("proc-6.1-nocache", "volumes"))
        assert (vol.cache, vol.key) == ("-", "erofs,img9")
        (cookie,) = parse_cookies(sample("proc-6.1-nocache", "cookies"))
        assert (cookie.key, cookie.state) == (b"img9", "-")


class TestTokens:
    """Fields are split on whitespace, never sliced at the header's column positions."""

    def test_fields_wider_than_columns(self):
        text = "00000010 123456 99999 100000 1234567 A cache with spaces\n"
        assert parse_caches(text) == [Cache(0x10, 123456, 99999, 100000, 1234567, "A", "cache with spaces")]

    def test_volume_without_padding(self):
        # e.g. text that went through a whitespace squeeze
        assert parse_volumes("00000004 4 3 1 1ff mytag erofs,dom\n") == [
            Volume(4, 4, 3, 1, 0x1FF, "mytag", "erofs,dom")]

    def test_volume_key_with_blank_and_fifteen_char_cache(self):
        # seq_printf "%08x %5d %5d %3d %02lx %-15.15s %s\n"
        line = f"{7:08x} {1:5d} {0:5d} {0:3d} {0x1F:02x} {'exactly15chars!':<15.15} erofs,a b\n"
        assert parse_volumes(line) == [Volume(7, 1, 0, 0, 0x1F, "exactly15chars!", "erofs,a b")]

    def test_cookie_wide_flags_and_counts(self):
        # seq_printf "%08x %08x %3d %3d %3d %c %02lx" + key hex
        line = f"{2:08x} {1:08x} {1000:3d} {2:3d} {3:3d} W {0x1FFFF:02x} {b'k'.hex()}\n"
        (c,) = parse_cookies(line)
        assert (c.ref, c.n_active, c.n_accesses, c.state, c.flags, c.key) == (1000, 2, 3, "W", 0x1FFFF, b"k")
        assert c.flag_names[-1] == "0x10000"

    def test_cookie_without_key_and_with_aux_only(self):
        assert parse_cookies("00000002 00000001   1   0   0 - 00\n")[0].key == b""
        c = parse_cookies("00000002 00000001   1   0   0 - 00 , 0102\n")[0]
        assert (c.key, c.aux) == (b"", b"\x01\x02")

    def test_non_utf8_key_text(self):
        (c,) = parse_cookies("00000002 00000001   1   0   0 A 00 ff41\n")
        assert c.key_text == "\\xffA"

    def test_headers_and_blank_lines_skipped(self):
        text = "CACHE    REF   VOLS  OBJS  ACCES S NAME\n====\n\n00000001 1 0 0 0 A t\n\n"
        assert len(parse_caches(text)) == 1

    @pytest.mark.parametrize("parser,line", [
        (parse_caches, "00000001 1 0 0 A name\n"),
        (parse_caches, "zzzzzzzz 1 0 0 0 A name\n"),
        (parse_volumes, "00000001 1 0 0 00\n"),
        (parse_cookies, "00000002 00000001 1 0 0 A 00 6g\n"),
        (parse_cookies, "00000002 00000001 1 0 0 AB 00 61\n"),
    ])
    def test_malformed(self, parser, line):
        with pytest.raises(ProcParseError):
            parser(line)


class TestStats:
    def test_excerpt_without_header(self):
        assert parse_stats("Acquire: n=1 ok=1 oom=0\nReads  : DR=1\n") == {"Acquire": {"n": 1, "ok": 1, "oom": 0}}

    def test_negative_and_unknown_counters(self):
        text = "FS-Cache statistics\nLRU    : n=0 exp=0 rmv=0 drp=0 at=-5\nFooBar : x=1 y=2\n"
        assert parse_stats(text) == {"LRU": {"n": 0, "exp": 0, "rmv": 0, "drp": 0, "at": -5},
                                     "FooBar": {"x": 1, "y": 2}}

    def test_garbage_in_block(self):
        with pytest.raises(ProcParseError):
            parse_stats("-- FS-Cache statistics --\nCookies: n=x\n")

    def test_format_unknown(self):
        assert stats_format("Cookies: n=1\n") is None


class TestRead:
    def _populate(self, d: Path, layout: str):
        d.mkdir(parents=True)
        for name in ("caches", "volumes", "cookies", "stats"):
            (d / name).write_text(sample(layout, name))

    def test_612_symlink_layout(self, tmp_path):
        self._populate(tmp_path / "netfs", "proc-6.12")
        (tmp_path / "fscache").symlink_to("netfs")
        root = tmp_path / "fscache"
        assert procfs.proc_layout(root) == "6.12"
        assert procfs.read_caches(root)[0].name == "mytag"
        assert procfs.read_volumes(root)[0].key == "erofs,dom"
        assert len(procfs.read_cookies(root)) == 3
        assert procfs.read_stats(root) == STATS_612

    def test_61_directory_layout(self, tmp_path):
        root = tmp_path / "fscache"
        self._populate(root, "proc-6.1")
        assert procfs.proc_layout(root) == "6.1"
        assert procfs.read_stats(str(root))["IO"] == {"rd": 9, "wr": 6}

    def test_absent(self, tmp_path):
        assert procfs.proc_layout(tmp_path / "nope") is None
        with pytest.raises(FileNotFoundError):
            procfs.read_stats(tmp_path / "nope")
