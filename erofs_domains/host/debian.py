"""Debian packages through a private apt configuration.

`PrivateApt` fetches binary and source packages from the Debian mirror this
machine already uses, without touching the system apt configuration: it writes
its own sources.list into a cache directory and points apt-get at it with
`-o Dir::...` options (private lists, private archive cache, no system
preferences).  The mirror URI is derived from the machine's apt sources
(`find_debian_mirror`); nothing here names a host.

The parsing helpers (`parse_deb822_sources`, `parse_one_line_sources`,
`debian_mirror_from_entries`, `version_compare`) are pure and unit-tested.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base.file_digest import sha256_file
from erofs_domains.host import deps

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# Codenames and aliases of the Debian archive.  A source entry whose suites are
# none of these (Ubuntu, a third-party repository) is not "the Debian archive".
DEBIAN_SUITES = frozenset({
    "buzz", "rex", "bo", "hamm", "slink", "potato", "woody", "sarge", "etch", "lenny", "squeeze",
    "wheezy", "jessie", "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke",
    "sid", "experimental", "rc-buggy", "stable", "testing", "unstable", "oldstable", "oldoldstable",
})  # fmt: skip
# Suffixes served by the main archive itself (not debian-security, not debug).
MAIN_ARCHIVE_SUFFIXES = ("", "-updates", "-backports", "-backports-sloppy", "-proposed-updates")


class DebianError(deps.ToolError):
    """A failure of the private apt machinery, with a message fit for a user."""

    exit_code = 1


class MirrorNotFound(DebianError):
    pass


# --------------------------------------------------------------------------
# apt sources parsing (pure)


@dataclass(frozen=True)
class SourceEntry:
    """One apt source: a deb822 stanza or a one-line `deb`/`deb-src` line."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    enabled: bool = True
    options: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def parse_deb822_sources(text: str) -> list[SourceEntry]:
    """Parse a deb822 `.sources` file (stanzas separated by blank lines)."""
    entries = []
    for stanza in _deb822_stanzas(text):
        fields = {k.lower(): v for k, v in stanza.items()}
        if "types" not in fields or "uris" not in fields:
            continue
        enabled = fields.get("enabled", "yes").strip().lower() not in ("no", "false", "0")
        options = {
            k: v
            for k, v in stanza.items()
            if k.lower() not in ("types", "uris", "suites", "components", "enabled")
        }
        entries.append(
            SourceEntry(
                types=tuple(fields["types"].split()),
                uris=tuple(fields["uris"].split()),
                suites=tuple(fields.get("suites", "").split()),
                components=tuple(fields.get("components", "").split()),
                enabled=enabled,
                options=options,
            )
        )
    return entries


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            continue  # comments may sit inside a stanza
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
            continue
        if line[0] in " \t":
            if key is not None:  # continuation line
                value = line.strip()
                stanza[key] = f"{stanza[key]}\n{value}" if value != "." else stanza[key] + "\n"
            continue
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        stanza[key] = value.strip()
    if stanza:
        yield stanza


_ONE_LINE = re.compile(r"^(?P<type>deb|deb-src)\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<rest>.*)$")


def parse_one_line_sources(text: str) -> list[SourceEntry]:
    """Parse a one-line-style sources.list (`deb [opts] URI SUITE COMPONENT...`)."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        m = _ONE_LINE.match(line)
        if not m:
            continue
        words = m["rest"].split()
        if len(words) < 2:
            continue
        options = {}
        for opt in (m["opts"] or "").split():
            k, _, v = opt.partition("=")
            options[k] = v
        entries.append(
            SourceEntry(
                types=(m["type"],),
                uris=(words[0],),
                suites=(words[1],),
                components=tuple(words[2:]),
                options=options,
            )
        )
    return entries


def is_debian_main_archive(entry: SourceEntry, uri: str, suite: str) -> bool:
    """True for the Debian archive proper: a Debian suite (not -security, not -debug),
    component main, and not a CD-ROM."""
    if not entry.enabled or "main" not in entry.components:
        return False
    if not {"deb", "deb-src"} & set(entry.types):
        return False
    if uri.startswith("cdrom:") or uri.rstrip("/").endswith("-security"):
        return False
    suite = suite.rstrip("/")
    for suffix in MAIN_ARCHIVE_SUFFIXES:
        if suffix and not suite.endswith(suffix):
            continue
        base = suite[: len(suite) - len(suffix)] if suffix else suite
        if base in DEBIAN_SUITES:
            return True
    return False


def debian_mirror_from_entries(entries: Iterable[SourceEntry]) -> str | None:
    """The URI of the first Debian main-archive source, without a trailing slash."""
    for entry in entries:
        for uri in entry.uris:
            if any(is_debian_main_archive(entry, uri, s) for s in entry.suites):
                return uri.rstrip("/")
    return None


def read_apt_sources(etc_apt: str | os.PathLike = "/etc/apt") -> list[SourceEntry]:
    """All sources of this machine, in apt's order: sources.list, then sources.list.d/
    in file-name order (`*.list` one-line files and `*.sources` deb822 files)."""
    etc = Path(etc_apt)
    entries: list[SourceEntry] = []
    main = etc / "sources.list"
    if main.is_file():
        entries += parse_one_line_sources(main.read_text(errors="replace"))
    parts = etc / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                entries += parse_one_line_sources(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                entries += parse_deb822_sources(path.read_text(errors="replace"))
    return entries


def security_mirror_from_entries(entries: Iterable[SourceEntry], mirror: str) -> str:
    """The URI serving `<codename>-security`: this machine's own security source if it has
    one, else the main mirror's sibling `.../debian-security` (the layout of deb.debian.org
    and of the official mirrors that carry security updates)."""
    for entry in entries:
        if not entry.enabled or "main" not in entry.components:
            continue
        for uri in entry.uris:
            if any(s.rstrip("/").endswith("-security") and s.split("-")[0] in DEBIAN_SUITES for s in entry.suites):
                return uri.rstrip("/")
    base = mirror.rstrip("/")
    return base[: -len("/debian")] + "/debian-security" if base.endswith("/debian") else base + "-security"


def find_debian_mirror(etc_apt: str | os.PathLike = "/etc/apt") -> str:
    uri = debian_mirror_from_entries(read_apt_sources(etc_apt))
    if uri is None:
        raise MirrorNotFound(
            f"no Debian main archive (component main of a Debian suite) found in the apt sources "
            f"under {etc_apt}; pass the mirror URI explicitly"
        )
    return uri


# --------------------------------------------------------------------------
# Debian version comparison (pure; dpkg's algorithm)


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def split_version(version: str) -> tuple[int, str, str]:
    """(epoch, upstream, revision) of a Debian version string."""
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def version_compare(a: str, b: str) -> int:
    """<0, 0, >0 like `dpkg --compare-versions`."""
    ea, ua, ra = split_version(a)
    eb, ub, rb = split_version(b)
    if ea != eb:
        return ea - eb
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def parse_control_records(text: str) -> list[dict[str, str]]:
    """Records of `apt-cache show`/`showsrc` output (deb822 without comments)."""
    return list(_deb822_stanzas(text))


# --------------------------------------------------------------------------
# the private apt


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PrivateApt:
    """apt-get/apt-cache on a private sources.list, lists and archive cache under `root`.

    Suites are added with `update(suites)` (each gets `deb` and `deb-src` lines, and they
    accumulate, so two tools can share one root); lists younger than `max_age` seconds are
    not fetched again unless new suites were added or `force` is given.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        mirror: str | None = None,
        *,
        keyring: str = DEBIAN_KEYRING,
        max_age: float = 24 * 3600,
        log: Callable[[str], None] = _stderr,
    ):
        self.root = Path(root)
        self.mirror = (mirror or find_debian_mirror()).rstrip("/")
        self.security_mirror = security_mirror_from_entries(read_apt_sources() if mirror is None else [], self.mirror)
        self.keyring = keyring
        self.max_age = max_age
        self.log = log
        self.sources_list = self.root / "sources.list"
        self.lists = self.root / "lists"
        self.cache = self.root / "apt"
        self.downloads = self.root / "downloads"
        self._state = self.root / "suites.json"
        self._stamp = self.root / "lists" / ".updated"

    # -- configuration ------------------------------------------------------

    def apt_options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.sources_list}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={self.lists}",
            "-o", f"Dir::Cache={self.cache}",
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", "Dir::State::status=/dev/null",
            "-o", "Acquire::Languages=none",
        ]  # fmt: skip

    def sources_text(self, suites: Iterable[str]) -> str:
        lines = []
        for suite in suites:
            # `bookworm-security` lives in its own archive (debian-security), not the mirror's.
            uri = self.security_mirror if suite.endswith("-security") else self.mirror
            for kind in ("deb", "deb-src"):
                lines.append(f"{kind} [signed-by={self.keyring}] {uri} {suite} main")
        return "\n".join(lines) + "\n"

    def configured_suites(self) -> list[str]:
        try:
            return list(json.loads(self._state.read_text()))
        except (OSError, ValueError):
            return []

    def _prepare_dirs(self) -> None:
        for d in (self.lists / "partial", self.cache / "archives" / "partial", self.downloads):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise users of this root (best effort: flock may be local-only on 9p)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:
                pass
            yield

    # -- running apt --------------------------------------------------------

    def _run(self, tool: str, *args: str, cwd: Path | None = None, quiet: bool = False) -> str:
        out: list[str] = []

        def line(text: str) -> None:
            out.append(text)
            if not quiet:
                self.log(f"  {tool}: {text.rstrip()}")

        cmd = [tool, *self.apt_options(), *args]
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", env={**os.environ, "LC_ALL": "C"})
        except FileNotFoundError as e:
            raise DebianError(f"{tool} not found: this needs a Debian-based host with apt") from e
        with proc:
            for text in proc.stdout:
                line(text)
        if proc.returncode:
            tail = "".join(out[-20:])
            raise DebianError(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
        return "".join(out)

    def update(self, suites: Iterable[str], *, force: bool = False) -> None:
        """Make sure `suites` (deb + deb-src, component main) are in the lists."""
        if not os.path.exists(self.keyring):
            raise DebianError(f"{self.keyring} is missing: install the Debian package debian-archive-keyring")
        with self.locked():
            self._prepare_dirs()
            have = self.configured_suites()
            wanted = have + [s for s in suites if s not in have]
            text = self.sources_text(wanted)
            changed = wanted != have or not self.sources_list.exists() or self.sources_list.read_text() != text
            try:
                age = time.time() - self._stamp.stat().st_mtime
            except OSError:
                age = float("inf")
            if not (force or changed or age > self.max_age):
                return
            self.sources_list.write_text(text)
            self._state.write_text(json.dumps(wanted))
            self.log(f"apt-get update for suites {' '.join(wanted)} (private lists in {self.lists})")
            self._run("apt-get", "-q", "update")
            self._stamp.touch()

    def drop_suites(self, suites: Iterable[str]) -> None:
        """Forget `suites` (an archive that cannot be reached), so that update() leaves them out."""
        with self.locked():
            keep = [s for s in self.configured_suites() if s not in set(suites)]
            self._state.write_text(json.dumps(keep))

    def _records(self, tool: str, *args: str) -> list[dict[str, str]]:
        return parse_control_records(self._run(tool, *args, quiet=True))

    def source_records(self, pkg: str) -> list[dict[str, str]]:
        return [r for r in self._records("apt-cache", "showsrc", "--only-source", pkg) if r.get("Package") == pkg]

    def newest_source_version(self, pkg: str) -> str:
        versions = [r["Version"] for r in self.source_records(pkg) if "Version" in r]
        if not versions:
            raise DebianError(f"no source package {pkg} in the suites {self.configured_suites()}")
        return max(versions, key=functools.cmp_to_key(version_compare))

    def download_source(self, pkg: str, version: str | None = None) -> Path:
        """Download source package `pkg` (newest if no version); return its orig tarball
        (the only tarball for a native package)."""
        version = version or self.newest_source_version(pkg)
        record = next((r for r in self.source_records(pkg) if r.get("Version") == version), None)
        if record is None:
            raise DebianError(f"source package {pkg}={version} not found")
        files = _checksums(record.get("Checksums-Sha256", ""))
        upstream = split_version(version)[1]
        tarball = _pick_tarball(pkg, upstream, version, files)
        dest = self.downloads / f"{pkg}_{version.replace(':', '%3a')}"
        path = dest / tarball
        with self.locked():
            if path.exists() and sha256_file(path) == files[tarball]:
                return path
            dest.mkdir(parents=True, exist_ok=True)
            self.log(f"downloading source package {pkg} {version}")
            self._run("apt-get", "-q", "source", "--download-only", f"{pkg}={version}", cwd=dest)
        if not path.exists() or sha256_file(path) != files[tarball]:
            raise DebianError(f"apt-get source did not produce {path} with the expected checksum")
        return path

    def newest_binary_version(self, pkg: str, suites: Iterable[str]) -> str:
        """The newest version of binary package `pkg` in `suites` only: one private root serves
        every kernel series, so other suites are configured too (bookworm-security carries a
        linux-source-6.12 as well, which must not stand in for trixie's)."""
        wanted = set(suites)
        rows = parse_madison(self._run("apt-cache", "madison", pkg, quiet=True))
        versions = [v for p, v, suite in rows if p == pkg and suite in wanted]
        if not versions:
            raise DebianError(f"no binary package {pkg} in the suites {' '.join(sorted(wanted))} "
                              f"(configured: {' '.join(self.configured_suites())})")
        return max(versions, key=functools.cmp_to_key(version_compare))

    def download_binary(self, pkg: str, version: str | None = None) -> Path:
        """Download binary package `pkg` (the candidate, or `version`); return the .deb."""
        spec = f"{pkg}={version}" if version else pkg
        records = [r for r in self._records("apt-cache", "show", spec) if r.get("Package") == pkg]
        if not records:
            raise DebianError(f"no binary package {spec} in the suites {self.configured_suites()}")
        rec = max(records, key=functools.cmp_to_key(lambda a, b: version_compare(a["Version"], b["Version"])))
        name = f"{pkg}_{rec['Version'].replace(':', '%3a')}_{rec['Architecture']}.deb"
        path = self.downloads / name
        with self.locked():
            if path.exists() and sha256_file(path) == rec.get("SHA256"):
                return path
            self.downloads.mkdir(parents=True, exist_ok=True)
            self.log(f"downloading {pkg} {rec['Version']}")
            self._run("apt-get", "-q", "download", f"{pkg}={rec['Version']}", cwd=self.downloads)
        if not path.exists():
            raise DebianError(f"apt-get download did not produce {path}")
        return path


def parse_madison(text: str) -> list[tuple[str, str, str]]:
    """`apt-cache madison` lines of binary packages -> (package, version, suite)."""
    rows = []
    for line in text.splitlines():
        parts = [x.strip() for x in line.split("|")]
        if len(parts) != 3:
            continue
        where = parts[2].split()  # URL, suite/component, arch, "Packages" (or "Sources")
        if len(where) == 4 and where[3] == "Packages":
            rows.append((parts[0], parts[1], where[1].split("/")[0]))
    return rows


def _checksums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3:
            out[words[2]] = words[0]
    return out


def _pick_tarball(pkg: str, upstream: str, version: str, files: dict[str, str]) -> str:
    orig = re.compile(rf"^{re.escape(pkg)}_{re.escape(upstream)}\.orig\.tar\.[a-z0-9]+$")
    native = re.compile(rf"^{re.escape(pkg)}_{re.escape(version.split(':')[-1])}\.tar\.[a-z0-9]+$")
    for pattern in (orig, native):
        for name in files:
            if pattern.match(name):
                return name
    raise DebianError(f"no orig tarball among {sorted(files)}")
