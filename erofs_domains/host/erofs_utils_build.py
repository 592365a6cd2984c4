"""The erofs-utils under test: named once, then used by every tool, image and test.

`resolve(mkfs=, src=)` picks it, in this order:

* a binary (`--mkfs`, `$MKFS_EROFS`): used as it is, with dump.erofs and fsck.erofs beside
  it; nothing is built or downloaded;
* an erofs-utils source tree (`--erofs-utils-src`, `$EROFS_TEST_EROFS_UTILS_SRC`):
  `build_from_tree()` copies its source files (never writing to the tree) and builds the copy
  as erofs-utils builds itself (`./autogen.sh`, `./configure`, `make`), with the tree's own
  configure defaults (plus `$EROFS_UTILS_CONFIGURE_FLAGS`);
* nothing: `build_from_debian()`, Debian sid's newest `erofs-utils` source package (keyed by
  its version), fetched through `debian.PrivateApt` and built with the suite's recipe
  (`CONFIGURE_FLAGS`).  Never "whatever build happens to be in the cache".

Builds land in `<cache>/erofs-utils/<key>/bin/` where `<cache>` is `$EROFS_TEST_CACHE`
(default `~/.cache/erofs-fscache-tests`) and `<key>` identifies the source (a digest of the
tree's source files, or the Debian version).  A finished entry is reused without autoconf
or a compiler; entries are created by an atomic rename of a private work directory, so
several processes (or VMs sharing the cache over 9p) never see a half-built entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from erofs_domains.base import (
    config,
    erofs_tools,  # the one probe of the tools
)
from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.proc import CmdError, cmd
from erofs_domains.host import debian, deps

TOOLS = erofs_tools.NAMES
ENV_NAMES = erofs_tools.ENV
# Bump when the recipe below changes, so old cache entries are not reused.
RECIPE = 2
# Debian builds only (the suite's own default erofs-utils); a tree is built with its own
# configure defaults plus $EROFS_UTILS_CONFIGURE_FLAGS.
CONFIGURE_FLAGS = [
    "--enable-lz4", "--enable-lzma", "--with-uuid", "--with-zlib",
    # optional features left out, so the result does not depend on what the host has
    "--disable-fuse", "--without-selinux", "--without-libzstd", "--without-libdeflate",
    "--without-qpl", "--without-xxhash", "--without-libcurl", "--without-openssl",
    "--without-libxml2", "--without-json-c", "--without-libnl3",
]  # fmt: skip

BUILD_DEPS = (
    deps.Dep("autoconf", "autoconf"),
    deps.Dep("aclocal", "automake"),
    deps.Dep("automake", "automake"),
    deps.Dep("libtoolize", "libtool"),
    deps.Dep("pkg-config", "pkg-config"),
    deps.Dep("make", "make"),
    deps.Dep("gcc", "gcc"),
    deps.Dep("/usr/include/uuid/uuid.h", "uuid-dev"),
    deps.Dep("/usr/include/lz4.h", "liblz4-dev"),
    deps.Dep("/usr/include/zlib.h", "zlib1g-dev"),
    deps.Dep("/usr/include/lzma.h", "liblzma-dev"),
)
DEBIAN_SUITE = "sid"
DEBIAN_PACKAGE = "erofs-utils"


class BuildError(deps.ToolError):
    exit_code = 1


@dataclass
class ErofsUtils:
    """A finished build: where the three tools are and what they are."""

    mkfs: str
    dump: str
    fsck: str
    version: str
    source: str
    key: str
    build_seconds: float
    cached: bool = False

    def env(self) -> dict[str, str]:
        return {ENV_NAMES[k]: getattr(self, k) for k in TOOLS if getattr(self, k)}

    def tools(self) -> erofs_tools.Tools:
        return erofs_tools.Tools(self.mkfs, self.dump or None, self.fsck or None)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_build_deps() -> None:
    """Raise deps.MissingDependency (exit code 2) naming the Debian packages to install."""
    deps.check(BUILD_DEPS, "build erofs-utils")


# --------------------------------------------------------------------------
# cache entries


def _entry(root: Path, key: str) -> ErofsUtils | None:
    info = root / key / "build-info.json"
    try:
        data = json.loads(info.read_text())
        # paths from where the cache is now (VMs may mount it elsewhere), not from the record
        data.update({k: str(root / key / "bin" / name) for k, name in TOOLS.items()})
        utils = ErofsUtils(**{**data, "cached": True})
    except (OSError, ValueError, TypeError):
        return None
    if not all(os.access(getattr(utils, k), os.X_OK) for k in TOOLS):
        return None
    return utils


def _works(utils: ErofsUtils) -> bool:
    """All three run (their libraries are installed) and report the recorded version."""
    return all(erofs_tools.version(getattr(utils, k)) == utils.version for k in TOOLS)


def _newest_debian_entry(root: Path) -> ErofsUtils | None:
    if not root.is_dir():
        return None
    entries = [e for e in (_entry(root, d.name) for d in root.glob("debian-*")) if e and _works(e)]
    key = functools.cmp_to_key(lambda a, b: debian.version_compare(a.source.split("=")[-1], b.source.split("=")[-1]))
    return max(entries, key=key, default=None)


def from_binary(mkfs: str | os.PathLike) -> ErofsUtils:
    """The erofs-utils a given mkfs.erofs belongs to: dump/fsck beside it ($DUMP_EROFS and
    $FSCK_EROFS only when $MKFS_EROFS names this mkfs).  Builds and downloads nothing."""
    path = os.path.abspath(mkfs)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise BuildError(f"mkfs.erofs {mkfs!r} is not an executable file")
    named_by_env = os.path.abspath(config.current().mkfs or "/nonexistent") == path
    tools = erofs_tools.Tools.beside(path, env=named_by_env)
    version = erofs_tools.version(path)
    if version is None:
        raise BuildError(f"{path} --version failed: not a working mkfs.erofs, or one older than 1.8 "
                         "(1.7 has no --version; the suite supports 1.8 and newer)")
    return ErofsUtils(mkfs=tools.mkfs, dump=tools.dump or "", fsck=tools.fsck or "", version=version,
                      source=f"given: {path}", key=erofs_tools.identity(path)[:16], build_seconds=0.0,
                      cached=True)


def resolve(mkfs: str | os.PathLike | None = None, src: str | os.PathLike | None = None, *,
            log: Callable[[str], None] = _stderr) -> ErofsUtils:
    """The erofs-utils under test: the binary `mkfs` as it is, or the tree `src` built (given
    on the command line); else $MKFS_EROFS, or $EROFS_TEST_EROFS_UTILS_SRC; else Debian's.
    Naming both at the same level is an error."""
    if not (mkfs or src):
        mkfs, src = config.current().mkfs, config.current().erofs_utils_src
    if mkfs and src:
        raise BuildError(f"both a mkfs.erofs ({mkfs}) and an erofs-utils tree ({src}) were named; "
                         "name one (the tree's build is <tree>/mkfs/mkfs.erofs)")
    if mkfs:
        return from_binary(mkfs)
    if src:
        return build_from_tree(src, log=log)
    return build_from_debian(log=log)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        with contextlib.suppress(OSError):  # flock may be unsupported (9p): rename still protects
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _cached_or_build(
    key: str,
    source: str,
    prepare: Callable[[Path], tuple[Path, dict[str, str]]],
    *,
    cache: Path | None,
    jobs: int | None,
    rebuild: bool,
    log: Callable[[str], None],
) -> ErofsUtils:
    root = (cache or cache_root()) / "erofs-utils"
    with _lock(root / f".{key}.lock"):
        hit = None if rebuild else _entry(root, key)
        if hit and _works(hit):  # runs the tools: their run-time libraries are there
            log(f"erofs-utils {hit.version}: cached in {root / key}")
            return hit
        require_build_deps()
        work = root / f".{key}.work-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            start = time.monotonic()
            srcdir, env = prepare(work)
            utils = _build(srcdir, work, key, source, env, jobs=jobs, log=log)
            utils.build_seconds = round(time.monotonic() - start, 1)
            final = root / key
            _publish(work, final, utils)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"erofs-utils {utils.version} built in {utils.build_seconds:.0f} s: {final / 'bin'}")
        return _entry(root, key) or utils


def _logfile(work: Path, key: str) -> Path:
    return work.parent / f"{key}.build.log"


def _publish(work: Path, final: Path, utils: ErofsUtils) -> None:
    """Move bin/ + build-info.json + build.log of `work` to `final` atomically."""
    staged = work / "entry"
    staged.mkdir()
    shutil.move(str(work / "bin"), staged / "bin")
    shutil.move(_logfile(work, utils.key), staged / "build.log")
    data = asdict(utils)
    del data["cached"]
    for k in TOOLS:
        data[k] = str(final / "bin" / TOOLS[k])
    (staged / "build-info.json").write_text(json.dumps(data, indent=2) + "\n")
    if final.exists():  # stale or explicitly rebuilt entry
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(staged, final)


def _build(
    srcdir: Path, work: Path, key: str, source: str, env: dict[str, str], *, jobs: int | None,
    log: Callable[[str], None],
) -> ErofsUtils:
    """Build as erofs-utils builds itself, in the (private) source copy."""
    jobs = jobs or os.cpu_count() or 1
    flags = env.pop("CONFIGURE_FLAGS", "").split()
    logfile = _logfile(work, key)  # next to the work dir: kept when the build fails
    logfile.write_text("")
    env = {**os.environ, **env, "LC_ALL": "C"}

    def step(title: str, prog: str, *args: str, cwd: Path) -> None:
        """One build step, its output appended to the build log (a file: not cmd(), which keeps
        output in memory); a failure raises with the command and the log's last lines."""
        log(f"  {title}")
        line = f"(cd {shlex.quote(str(cwd))} && {shlex.join([prog, *args])})"
        with open(logfile, "a") as f:
            f.write(f"\n$ {line}\n")
            f.flush()
            rc = subprocess.run([prog, *args], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
            tail = "".join(logfile.read_text(errors="replace").splitlines(True)[-30:])
            raise BuildError(f"{title} failed (exit {rc}): {line}\nlog: {logfile}\n{tail}")

    step("./autogen.sh", "sh", "./autogen.sh", cwd=srcdir)
    step(f"./configure {' '.join(flags)}".rstrip(), "./configure", *flags, cwd=srcdir)
    step(f"make -j{jobs}", "make", f"-j{jobs}", cwd=srcdir)
    bindir = work / "bin"
    bindir.mkdir()
    for k, name in TOOLS.items():
        built = srcdir / k / name
        if not built.is_file() or built.read_bytes()[:4] != b"\x7fELF":
            raise BuildError(f"{built} was not built as an executable; see {logfile}")
        shutil.copy2(built, bindir / name)
    version = erofs_tools.version(bindir / TOOLS["mkfs"])
    if version is None:
        raise BuildError(f"{bindir / TOOLS['mkfs']} --version failed (erofs-utils before 1.8 has no --version; "
                         f"the suite supports 1.8 and newer); see {logfile}")
    return ErofsUtils(
        **{k: str(bindir / n) for k, n in TOOLS.items()},
        version=version, source=source, key=key, build_seconds=0.0,
    )


# --------------------------------------------------------------------------
# sources

_IGNORED_OUTSIDE_GIT = {".git", "autom4te.cache", ".libs", ".deps"}
_IGNORED_SUFFIXES = (".o", ".lo", ".la", ".a", ".so")
# What a test run writes into a tree and never is erofs-utils source: left out of the build key
# and the copy even when git does not ignore it.
_RUN_JUNK = {"__pycache__", "results", ".tox", ".hypothesis", ".pytest_cache"}
# A copy of this suite inside the tree (tools/plug-into-erofs-utils, or a submodule) is not
# part of erofs-utils' build: its directory is recognised by this file.
_SUITE_MARK = "erofs_domains/base/erofs_tools.py"


def _source_only(files: list[str], tracked: set[str]) -> list[str]:
    suites = [f[: -len(_SUITE_MARK)] for f in files if f == _SUITE_MARK or f.endswith("/" + _SUITE_MARK)]
    out = []
    for f in files:
        if any(s and f.startswith(s) for s in suites) or (f not in tracked and _RUN_JUNK & set(f.split("/"))):
            continue
        out.append(f)
    return out


def _git_files(src: Path, *which: str) -> list[str]:
    out = cmd(["git", "--no-optional-locks", "-C", src, "ls-files", "-z", *which]).stdout
    return [f for f in out.split("\0") if f]


def _tree_files(src: Path) -> list[str]:
    """Relative paths of the source files of `src` (read-only; never writes to the tree):
    what git tracks plus untracked files it does not ignore, without what a test run writes
    (results/, __pycache__/, ...) and without a copy of this suite."""
    try:
        tracked = set(_git_files(src, "--cached"))
        files = sorted(tracked | set(_git_files(src, "--others", "--exclude-standard")))
        files = [f for f in files if (src / f).is_file() or (src / f).is_symlink()]  # not deleted ones
        return _source_only(files, tracked)
    except (CmdError, OSError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED_OUTSIDE_GIT]
        for name in filenames:
            if not name.endswith(_IGNORED_SUFFIXES):
                files.append(os.path.relpath(os.path.join(dirpath, name), src))
    return _source_only(sorted(files), set())


def _scm_version(src: Path) -> str:
    script = src / "scripts" / "get-version-number"
    if script.is_file():
        with contextlib.suppress(CmdError, OSError):
            return cmd(["sh", script], cwd=src).stdout.strip()
    with contextlib.suppress(OSError):
        return (src / "VERSION").read_text().split()[0]
    return "unknown"


def tree_configure_flags() -> list[str]:
    return config.current().erofs_utils_configure_flags.split()


def source_key(src: Path) -> tuple[str, str, list[str]]:
    """(cache key, version string, files): the key digests the content of every source file,
    the version string (which carries the git commit and -dirty) and the configure flags."""
    src = src.resolve()
    files = _tree_files(src)
    version = _scm_version(src)
    flags = " ".join(tree_configure_flags())
    h = hashlib.sha256(f"recipe={RECIPE}\0version={version}\0flags={flags}\0".encode())
    for rel in files:
        p = src / rel
        h.update(rel.encode() + b"\0")
        h.update((os.readlink(p).encode() if p.is_symlink() else p.read_bytes()) + b"\0")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.name)
    return f"src-{name}-{h.hexdigest()[:16]}", version, files


def build_from_tree(
    src: str | os.PathLike,
    *,
    cache: Path | None = None,
    jobs: int | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = _stderr,
) -> ErofsUtils:
    src = Path(src).resolve()
    if not (src / "configure.ac").is_file():
        raise BuildError(f"{src} is not an erofs-utils source tree (no configure.ac)")
    key, version, files = source_key(src)

    def prepare(work: Path) -> tuple[Path, dict[str, str]]:
        log(f"copying {len(files)} files of {src}")
        dest = work / "src"
        for rel in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, target, follow_symlinks=False)
        return dest, {"EROFS_UTILS_VERSION": version, "CONFIGURE_FLAGS": " ".join(tree_configure_flags())}

    log(f"erofs-utils from {src} (version {version}, key {key})")
    return _cached_or_build(key, str(src), prepare, cache=cache, jobs=jobs, rebuild=rebuild, log=log)


def build_from_debian(
    *,
    version: str | None = None,
    cache: Path | None = None,
    mirror: str | None = None,
    refresh: bool = False,
    jobs: int | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = _stderr,
) -> ErofsUtils:
    cache = cache or cache_root()
    apt = debian.PrivateApt(cache / "apt", mirror, log=log, max_age=0 if refresh else 24 * 3600)
    try:
        apt.update([DEBIAN_SUITE])
        version = version or apt.newest_source_version(DEBIAN_PACKAGE)
    except debian.DebianError as e:
        fallback = None if (version or rebuild) else _newest_debian_entry(cache / "erofs-utils")
        if fallback is None:
            raise
        log(f"warning: cannot ask the Debian archive ({str(e).splitlines()[0]}); using the cached build")
        return fallback
    key = f"debian-{version.replace(':', '_')}-r{RECIPE}"

    def prepare(work: Path) -> tuple[Path, dict[str, str]]:
        tarball = apt.download_source(DEBIAN_PACKAGE, version)
        log(f"unpacking {tarball.name}")
        dest = work / "src"
        # tar(1), not tarfile: extractall(filter=) needs Python 3.11.4+, Debian 12 has 3.11.2.
        (work / "unpack").mkdir()
        listing = cmd(["tar", "-tf", tarball])
        tops = {name.split("/", 1)[0] for name in listing.stdout.splitlines() if name}
        if any(t in ("", "..") for t in tops) or any(".." in n.split("/") for n in listing.stdout.splitlines()):
            raise deps.ToolError(f"{tarball}: refusing a source tarball with absolute or '..' paths")
        cmd(["tar", "-xf", tarball, "-C", work / "unpack", "--no-same-owner", "--no-same-permissions"])
        top = work / "unpack" / tops.pop() if len(tops) == 1 else work / "unpack"
        os.rename(top, dest)
        return dest, {"EROFS_UTILS_VERSION": debian.split_version(version)[1],
                      "CONFIGURE_FLAGS": " ".join(CONFIGURE_FLAGS)}

    log(f"erofs-utils {version} from Debian {DEBIAN_SUITE}")
    return _cached_or_build(key, f"debian:{DEBIAN_PACKAGE}={version}", prepare, cache=cache, jobs=jobs,
                            rebuild=rebuild, log=log)
