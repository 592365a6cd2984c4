"""erofs_domains/host/debian.py: the mirror URI derived from apt sources, version ordering and the
private apt configuration (pure: no apt-get runs here)."""


import pytest

from erofs_domains.host import debian
from erofs_domains.host.debian import (
    MirrorNotFound,
    PrivateApt,
    debian_mirror_from_entries,
    find_debian_mirror,
    parse_deb822_sources,
    parse_one_line_sources,
    version_compare,
)

MIRROR = "http://mirror.example.org/debian"
SECURITY = "http://security.example.org/debian-security"

DEB822 = f"""\
Types: deb
# a comment inside the stanza: http://snapshot.example.org/archive/debian/20250520T000000Z
URIs: {MIRROR}/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

ONE_LINE = f"""\
# deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb {SECURITY} bookworm-security main contrib
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} bookworm main non-free-firmware
deb-src {MIRROR} bookworm main   # trailing comment
"""


def test_deb822_fields():
    entries = parse_deb822_sources(DEB822)
    assert [e.uris for e in entries] == [(f"{MIRROR}/",), (SECURITY,)]
    assert entries[0].suites == ("bookworm", "bookworm-updates")
    assert entries[0].components == ("main",) and entries[0].types == ("deb",)
    assert entries[0].options["Signed-By"].endswith("debian-archive-keyring.gpg")


def test_deb822_mirror():
    assert debian_mirror_from_entries(parse_deb822_sources(DEB822)) == MIRROR


def test_deb822_security_first_disabled_and_foreign_stanzas_are_skipped():
    text = f"""\
Types: deb
URIs: {SECURITY}
Suites: trixie-security
Components: main

Types: deb
URIs: http://other.example.org/debian
Suites: sid
Components: main
Enabled: no

Types: deb
URIs: http://archive.example.org/ubuntu
Suites: noble noble-updates
Components: main universe

Types: deb deb-src
URIs: http://contrib-only.example.org/debian
Suites: trixie
Components: contrib

Types: deb-src
URIs: {MIRROR}
Suites: trixie
Components: main contrib
"""
    assert debian_mirror_from_entries(parse_deb822_sources(text)) == MIRROR


def test_one_line_fields():
    entries = parse_one_line_sources(ONE_LINE)
    assert [(e.types, e.uris, e.suites) for e in entries] == [
        (("deb",), (SECURITY,), ("bookworm-security",)),
        (("deb",), (MIRROR,), ("bookworm",)),
        (("deb-src",), (MIRROR,), ("bookworm",)),
    ]
    assert entries[1].options == {"arch": "amd64", "signed-by": "/usr/share/keyrings/debian-archive-keyring.gpg"}
    assert entries[2].components == ("main",)


def test_one_line_mirror():
    assert debian_mirror_from_entries(parse_one_line_sources(ONE_LINE)) == MIRROR


@pytest.mark.parametrize("suite", ["sid", "unstable", "stable", "trixie-backports", "bookworm-proposed-updates"])
def test_debian_suites_are_recognised(suite):
    assert debian_mirror_from_entries(parse_one_line_sources(f"deb {MIRROR} {suite} main")) == MIRROR


@pytest.mark.parametrize("line", [
    f"deb {MIRROR} jammy main",  # not a Debian suite
    f"deb {SECURITY} bookworm-security main",
    f"deb {MIRROR}-debug bookworm-debug main",
    f"deb {MIRROR} bookworm contrib non-free",
    "deb cdrom:[Debian]/ bookworm main",
    f"# deb {MIRROR} bookworm main",
])  # fmt: skip
def test_not_a_main_archive(line):
    assert debian_mirror_from_entries(parse_one_line_sources(line)) is None


def test_find_debian_mirror_reads_apt_order(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "a.list").write_text("deb http://a.example.org/debian sid main\n")
    (tmp_path / "sources.list.d" / "b.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "0.list.disabled").write_text("deb http://x.example.org/debian sid main\n")
    assert find_debian_mirror(tmp_path) == "http://a.example.org/debian"
    (tmp_path / "sources.list.d" / "a.list").unlink()
    assert find_debian_mirror(tmp_path) == MIRROR
    (tmp_path / "sources.list").write_text(ONE_LINE.replace(MIRROR, "http://first.example.org/debian"))
    assert find_debian_mirror(tmp_path) == "http://first.example.org/debian"


def test_no_mirror_is_an_error(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://archive.example.org/ubuntu noble main\n")
    with pytest.raises(MirrorNotFound, match="no Debian main archive"):
        find_debian_mirror(tmp_path)


@pytest.mark.parametrize("a,b,sign", [
    ("1.9.4-1", "1.9.4-2", -1),
    ("1.9.4-1", "1.9.10-1", -1),
    ("1.9.4-1", "1.9.4-1", 0),
    ("1.0", "1.0-0", 0),
    ("1:1.0-1", "2.0-1", 1),
    ("1.0~rc1-1", "1.0-1", -1),
    ("1.0-1", "1.0+deb12u1-1", -1),
    ("6.12.117-1", "6.12.57-1", 1),
    ("1.0a", "1.0", 1),
])  # fmt: skip
def test_version_compare(a, b, sign):
    got = version_compare(a, b)
    assert (got > 0) - (got < 0) == sign


def test_split_version():
    assert debian.split_version("1:2.3-4-5") == (1, "2.3-4", "5")
    assert debian.split_version("1.9.4") == (0, "1.9.4", "")


def test_private_apt_configuration(tmp_path):
    apt = PrivateApt(tmp_path, MIRROR + "/")
    assert apt.sources_text(["sid", "trixie"]).splitlines() == [
        f"deb [signed-by={debian.DEBIAN_KEYRING}] {MIRROR} sid main",
        f"deb-src [signed-by={debian.DEBIAN_KEYRING}] {MIRROR} sid main",
        f"deb [signed-by={debian.DEBIAN_KEYRING}] {MIRROR} trixie main",
        f"deb-src [signed-by={debian.DEBIAN_KEYRING}] {MIRROR} trixie main",
    ]
    opts = apt.apt_options()
    pairs = dict(o.split("=", 1) for o in opts[1::2])
    assert opts[0::2] == ["-o"] * len(pairs)
    assert pairs["Dir::Etc::SourceList"] == str(tmp_path / "sources.list")
    assert pairs["Dir::Etc::SourceParts"] == "/dev/null"
    assert pairs["Dir::State::Lists"] == str(tmp_path / "lists")
    assert pairs["Dir::Cache"] == str(tmp_path / "apt")
    assert not any(v.startswith("/etc/apt") or v.startswith("/var/lib/apt") for v in pairs.values())


def test_security_suites_come_from_the_security_archive(tmp_path):
    apt = PrivateApt(tmp_path, MIRROR)
    assert apt.sources_text(["bookworm-security", "bookworm"]).splitlines()[::2] == [
        f"deb [signed-by={debian.DEBIAN_KEYRING}] http://mirror.example.org/debian-security bookworm-security main",
        f"deb [signed-by={debian.DEBIAN_KEYRING}] {MIRROR} bookworm main",
    ]
    # this machine's own security source wins over the sibling guess
    assert debian.security_mirror_from_entries(parse_deb822_sources(DEB822), MIRROR) == SECURITY
    assert debian.security_mirror_from_entries(parse_one_line_sources(ONE_LINE), MIRROR) == SECURITY
    assert debian.security_mirror_from_entries([], "http://ftp.example.org/mirror") == \
        "http://ftp.example.org/mirror-security"


def test_drop_suites_forgets_an_unreachable_archive(tmp_path):
    apt = PrivateApt(tmp_path, MIRROR)
    apt._state.write_text('["bookworm-security", "bookworm", "sid"]')
    apt.drop_suites(["bookworm-security"])
    assert apt.configured_suites() == ["bookworm", "sid"]


SHOWSRC = """\
Package: erofs-utils
Binary: erofs-utils, erofsfuse
Version: 1.9.4-1
Checksums-Sha256:
 aaaa 2000 erofs-utils_1.9.4-1.dsc
 bbbb 270000 erofs-utils_1.9.4.orig.tar.gz
 cccc 9000 erofs-utils_1.9.4-1.debian.tar.xz

Package: erofs-utils
Version: 1.8.10-1
Checksums-Sha256:
 dddd 2000 erofs-utils_1.8.10-1.dsc
 eeee 260000 erofs-utils_1.8.10.orig.tar.gz
"""


def test_newest_source_version_and_tarball(tmp_path, monkeypatch):
    apt = PrivateApt(tmp_path, MIRROR)
    monkeypatch.setattr(apt, "_run", lambda *a, **k: SHOWSRC)
    assert apt.newest_source_version("erofs-utils") == "1.9.4-1"
    rec = apt.source_records("erofs-utils")[0]
    files = debian._checksums(rec["Checksums-Sha256"])
    assert files["erofs-utils_1.9.4.orig.tar.gz"] == "bbbb"
    assert debian._pick_tarball("erofs-utils", "1.9.4", "1.9.4-1", files) == "erofs-utils_1.9.4.orig.tar.gz"
    native = {"pkg_2.0.tar.xz": "x", "pkg_2.0.dsc": "y"}
    assert debian._pick_tarball("pkg", "2.0", "2.0", native) == "pkg_2.0.tar.xz"


# `apt-cache madison linux-source-6.12` on a root holding trixie, bookworm-security and sid
# (a fresh Debian 12 root, 2026-12: bookworm-security had moved to 6.12.118).
MADISON = """\
linux-source-6.12 | 6.12.118-1~deb12u1 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-source-6.12 | 6.12.117-1 | http://deb.debian.org/debian trixie/main amd64 Packages
linux-source-6.12 | 6.12.117-1~deb12u1 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-source-6.12 | 6.12.107-1 | http://deb.debian.org/debian trixie/main amd64 Packages
     linux | 6.12.117-1 | http://deb.debian.org/debian trixie/main Sources
linux-6.12 | 6.12.118-1~deb12u1 | http://deb.debian.org/debian-security bookworm-security/main Sources
"""


def test_a_series_takes_its_own_suites_version_only(tmp_path, monkeypatch):
    """6.12 is trixie's: the newer 6.12.118~deb12u1 of bookworm-security (configured for 6.1)
    must not stand in for it."""
    apt = PrivateApt(tmp_path, MIRROR)
    monkeypatch.setattr(apt, "_run", lambda *a, **k: MADISON)
    assert debian.parse_madison(MADISON)[0] == ("linux-source-6.12", "6.12.118-1~deb12u1", "bookworm-security")
    assert len(debian.parse_madison(MADISON)) == 4  # the Sources lines are not binaries
    assert apt.newest_binary_version("linux-source-6.12", ("trixie",)) == "6.12.117-1"
    assert apt.newest_binary_version("linux-source-6.12", ("trixie", "bookworm-security")) == "6.12.118-1~deb12u1"
    with pytest.raises(debian.DebianError, match="no binary package linux-source-6.12 in the suites sid"):
        apt.newest_binary_version("linux-source-6.12", ("sid",))
