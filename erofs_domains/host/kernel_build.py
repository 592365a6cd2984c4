"""Build a test kernel from a source tree: allnoconfig + fragment, out of tree, cached.

Layout under the cache root:
  src/linux-source-<ver>/      Debian's linux-source package, unpacked (the default tree)
  kbuild/<key>/                O= build directory, key = hash(tree path, fragments): an edited
                               tree rebuilds incrementally in the same directory
  kernels/<sha256>/bzImage     finished images, kept by content, with their .config
"""

import gzip
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.base import config
from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.layout import KCONFIG_DIR
from erofs_domains.base.proc import CmdError, cmd
from erofs_domains.guest.kernel_features import REQUIRED_OPTIONS
from erofs_domains.host import deps, validate

# `git bisect run` skips a revision when the script exits 125.
EXIT_TREE_DOES_NOT_BUILD = 125


@dataclass(frozen=True)
class DebianKernel:
    """A kernel series the suite runs on: Debian's source package for it and its fragments."""

    series: str                  # "6.1", the value of --kernel-version
    package: str                 # Debian's linux-source-<series>
    suites: tuple[str, ...]      # where to look; the newest version across them wins
    fragments: tuple[str, ...]   # tools/kconfig/ files for the default profile, merged in order
    backend: str                 # what carries domain_id there: "fscache" or "pagecache"
    per_push: bool = True        # .ci/run runs it on every push (else on demand and in tox -e matrix)


KERNELS = {
    # 6.1: domain_id's first release; bookworm-security carries the newest stable (6.1.192),
    # bookworm itself the point release's (6.1.176) when the security archive is unreachable.
    "6.1": DebianKernel("6.1", "linux-source-6.1", ("bookworm-security", "bookworm"),
                        ("ondemand.config",), "fscache"),
    "6.12": DebianKernel("6.12", "linux-source-6.12", ("trixie",), ("ondemand.config",), "fscache"),
    # 7.2: the fscache backend is gone; domain_id= lives on as page-cache sharing (inode_share).
    "7.2": DebianKernel("7.2", "linux-source-7.2", ("sid",), ("pagecache.config",), "pagecache"),
    # 7.3: the newest stable (7.3.4 in trixie-backports; experimental has the release candidates).
    # cachefiles' on-demand mode is gone too (no fs/cachefiles/ondemand.c).
    # On demand until its strict run has a CI record (.ci/run's cold time with it: README).
    "7.3": DebianKernel("7.3", "linux-source-7.3", ("trixie-backports", "experimental"), ("pagecache.config",),
                        "pagecache", per_push=False),
}
DEFAULT_KERNEL_VERSION = "6.12"
PER_PUSH = tuple(s for s, k in KERNELS.items() if k.per_push)
DEFAULT_PACKAGE = KERNELS[DEFAULT_KERNEL_VERSION].package
DEFAULT_SUITE = KERNELS[DEFAULT_KERNEL_VERSION].suites[0]
# Profiles add fragments after the version's own ones.
PROFILES = {
    "default": [],
    "debug": ["debug.config"],
}




def series_of_tree(version: tuple[int, ...]) -> DebianKernel:
    """The newest series not after `version`: a maintainer's 6.6 tree builds like 6.1's."""
    fitting = [k for k in KERNELS.values() if version_tuple(k.series) <= tuple(version)]
    return max(fitting, key=lambda k: version_tuple(k.series)) if fitting else KERNELS["6.1"]


def choose_series(version: str | None, src: Path | None = None) -> DebianKernel:
    """--kernel-version, else $EROFS_TEST_KERNEL_VERSION, else the given tree's, else the default."""
    version = version or config.current().kernel_version
    if version is None and src is not None and (tv := tree_version(Path(src))):
        return series_of_tree(tv)
    return kernel_series(version)


def kernel_series(version: str | None) -> DebianKernel:
    version = version or DEFAULT_KERNEL_VERSION
    if version not in KERNELS:
        raise deps.ToolError(f"unknown kernel version {version!r}; choose from {', '.join(KERNELS)}")
    return KERNELS[version]


class BuildFailed(deps.ToolError):
    exit_code = EXIT_TREE_DOES_NOT_BUILD


# A fragment line whose option exists only in some kernels says so first in its comment:
#   CONFIG_EROFS_FS_BACKED_BY_FILE=y  # kernel>=6.12: file-backed mounts
#   CONFIG_EROFS_FS_ONDEMAND=y        # kernel<7.2: the fscache backend (removed in 7.2)
# Outside that range the line is left out (and said so); inside it a dropped line is an error.
_RANGE = re.compile(r"^kernel\s*((?:(?:>=|<)\s*\d+(?:\.\d+){1,2}\s*,?\s*)+):")
_BOUND = re.compile(r"(>=|<)\s*(\d+(?:\.\d+){1,2})")


def version_tuple(text: str) -> tuple[int, ...]:
    parts = tuple(int(x) for x in text.split("."))
    return parts + (0,) * (3 - len(parts))


@dataclass(frozen=True)
class FragmentLine:
    name: str
    value: str
    since: tuple[int, ...] | None = None   # first kernel with the option
    until: tuple[int, ...] | None = None   # first kernel without it

    def applies(self, version: tuple[int, ...] | None) -> bool:
        if version is None:
            return True
        return (self.since is None or version >= self.since) and (self.until is None or version < self.until)

    def range_text(self) -> str:
        def v(t):
            return ".".join(map(str, t[:2] if t[2] == 0 else t))

        bounds = ([f">={v(self.since)}"] if self.since else []) + ([f"<{v(self.until)}"] if self.until else [])
        return "kernel" + ",".join(bounds)


def parse_fragment_lines(text: str) -> list[FragmentLine]:
    """Fragment lines `CONFIG_X=v  # why` and `# CONFIG_X is not set`, with their kernel range."""
    out = []
    for line in text.splitlines():
        m = re.match(r"#\s*(CONFIG_\w+) is not set", line.strip())
        if m:
            out.append(FragmentLine(m.group(1), "n"))
            continue
        body, _, comment = line.partition("#")
        body = body.strip()
        if not body:
            continue
        name, _, value = body.partition("=")
        since = until = None
        rm = _RANGE.match(comment.strip())
        if rm:
            for op, ver in _BOUND.findall(rm.group(1)):
                if op == ">=":
                    since = version_tuple(ver)
                else:
                    until = version_tuple(ver)
        out.append(FragmentLine(name.strip(), value.strip(), since, until))
    return out


def parse_fragment(text: str, version: tuple[int, ...] | None = None) -> dict[str, str]:
    """The options of a fragment that exist in kernel `version` (all of them for None)."""
    return {f.name: f.value for f in parse_fragment_lines(text) if f.applies(version)}


def tree_version(src: Path) -> tuple[int, int, int] | None:
    """VERSION.PATCHLEVEL.SUBLEVEL from a kernel tree's top Makefile."""
    try:
        text = (Path(src) / "Makefile").read_text(errors="replace")[:2000]
    except OSError:
        return None
    got = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d+)", text, re.M))
    if {"VERSION", "PATCHLEVEL"} - set(got):
        return None
    return int(got["VERSION"]), int(got["PATCHLEVEL"]), int(got.get("SUBLEVEL", 0))


def parse_dotconfig(text: str) -> dict[str, str]:
    return parse_fragment(text)


def render_fragment(options: dict[str, str]) -> str:
    """kconfig does not allow trailing comments: write a clean KCONFIG_ALLCONFIG file."""
    lines = []
    for name, value in options.items():
        lines.append(f"# {name} is not set" if value == "n" else f"{name}={value}")
    return "\n".join(lines) + "\n"


def dropped_options(wanted: dict[str, str], dotconfig: dict[str, str]) -> list[str]:
    """Options of the fragment that did not end up in .config as written."""
    bad = []
    for name, value in wanted.items():
        got = dotconfig.get(name, "n")
        if got != value:
            bad.append(f"{name}={value} (got {got if name in dotconfig else 'unset'})")
    return bad


def fragment_paths(profile: str, extra: list[Path], series: DebianKernel | None = None) -> list[Path]:
    if profile not in PROFILES:
        raise deps.ToolError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    series = series or kernel_series(None)
    return [KCONFIG_DIR / f for f in (*series.fragments, *PROFILES[profile])] + [Path(p) for p in extra]


def load_fragments(profile: str, extra: list[Path], series: DebianKernel | None = None,
                   version: tuple[int, ...] | None = None, log=None) -> dict[str, str]:
    """The options to build with: the series' fragments, the profile's, then `extra`; lines
    whose kernel range excludes `version` are left out (named through `log`)."""
    options: dict[str, str] = {}
    for path in fragment_paths(profile, extra, series):
        if not path.is_file():
            raise deps.ToolError(f"config fragment {path} does not exist")
        for line in parse_fragment_lines(path.read_text()):
            if line.applies(version):
                options[line.name] = line.value
            elif log:
                log(f"{path.name}: {line.name} left out: it exists in {line.range_text()}, "
                    f"this tree is {'.'.join(map(str, version or ()))}")
    return options


def check_clean_tree(src: Path) -> None:
    """`make O=` refuses a tree holding an in-tree build ("source tree is not clean")."""
    leftovers = [p for p in (".config", "include/config", "arch/x86/include/generated") if (src / p).exists()]
    if leftovers:
        raise deps.ToolError(
            f"kernel tree {src} holds an in-tree build ({', '.join(leftovers)}), so an out-of-tree "
            f"build (make O=...) refuses it. Run `make -C {src} mrproper` (it deletes that "
            f"build and its .config; save the .config first if you need it), or pass a clean "
            f"worktree: `git -C {src} worktree add /tmp/linux-test HEAD`."
        )


def is_kernel_tree(src: Path) -> bool:
    return validate.is_kernel_tree(src)


def fetch_debian_source(package: str = DEFAULT_PACKAGE, suite: str | tuple[str, ...] = DEFAULT_SUITE,
                        log=print) -> Path:
    """Download and unpack Debian's linux-source package through a private apt configuration.

    With several suites the newest version among them wins (never one of another suite the
    private root also holds); a suite whose archive cannot be reached (bookworm-security behind
    a mirror without it) is dropped with a note."""
    from erofs_domains.host.debian import DebianError, PrivateApt

    suites = (suite,) if isinstance(suite, str) else tuple(suite)
    apt = PrivateApt(cache_root() / "apt")
    try:
        apt.update(suites)
    except DebianError as e:
        if len(suites) < 2:
            raise
        log(f"apt-get update with {' '.join(suites)} failed; trying {' '.join(suites[1:])} ({str(e)[-200:]})")
        apt.drop_suites(suites[:1])
        apt.update(suites[1:], force=True)
        suites = suites[1:]
    deb = Path(apt.download_binary(package, apt.newest_binary_version(package, suites)))
    version = deb.name.split("_")[1]
    dest = cache_root() / "src" / f"{package}-{version}"
    tree = dest / package
    if is_kernel_tree(tree):
        return tree
    log(f"unpacking {deb.name} into {dest}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    member = f"./usr/src/{package}.tar.xz"
    # Shell tools: tarfile in Python takes minutes for the ~90k files of a kernel tree.
    pipeline = (f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -xO {shlex.quote(member)} "
                f"| tar -xJ -C {shlex.quote(str(tmp))}")
    try:
        cmd(["bash", "-o", "pipefail", "-c", pipeline])
    except CmdError as e:
        raise deps.ToolError(f"cannot unpack {deb}: {e}") from e
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return tree


@dataclass
class KernelBuild:
    src: Path
    options: dict[str, str]
    profile: str = "default"
    pristine: bool = False  # an unpacked Debian package nobody edits: trust the stamp
    jobs: int = os.cpu_count() or 2
    log = staticmethod(lambda msg: print(f"build-kernel: {msg}", file=sys.stderr, flush=True))

    @property
    def key(self) -> str:
        h = hashlib.sha256(str(self.src.resolve()).encode() + b"\0" + render_fragment(self.options).encode())
        return h.hexdigest()[:16]

    @property
    def builddir(self) -> Path:
        return cache_root() / "kbuild" / self.key

    def _make(self, *targets: str, progress: bool = False, **env: str) -> None:
        argv = ["make", "-C", str(self.src), f"O={self.builddir}", "ARCH=x86_64", f"-j{self.jobs}", *targets]
        proc_env = dict(os.environ, **env)
        if not progress:
            try:
                cmd(argv, env=proc_env)
            except CmdError as e:
                raise BuildFailed(str(e)) from e
            return
        # Stream `make` and show a one-line progress: how many objects, which one now (not
        # cmd(), which returns the output at the end); a failure raises with make's last lines.
        tail: list[str] = []
        n = 0
        start = time.monotonic()
        tty = sys.stderr.isatty()
        with subprocess.Popen(argv, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:
                tail = (tail + [line.rstrip()])[-40:]
                if line.startswith(("  CC", "  LD", "  AR", "  AS")):
                    n += 1
                    msg = f"[{time.monotonic() - start:5.0f}s] {n:5d} objects  {line.strip()[:70]}"
                    if tty:
                        print("\r" + msg.ljust(100), end="", file=sys.stderr, flush=True)
                    elif n % 200 == 0:
                        self.log(msg)
            rc = p.wait()
        if tty:
            print(file=sys.stderr)
        if rc:
            errors = [line for line in tail if "error" in line.lower()] or tail[-15:]
            raise BuildFailed(
                f"the kernel tree {self.src} does not build ({shlex.join(argv)} exited {rc}); exit status "
                f"{EXIT_TREE_DOES_NOT_BUILD} tells `git bisect run` to skip this revision. Last errors:\n"
                + "\n".join(errors[-15:])
            )

    def configure(self) -> None:
        self.builddir.mkdir(parents=True, exist_ok=True)
        frag = self.builddir / "fragment.config"
        text = render_fragment(self.options)
        dotconfig = self.builddir / ".config"
        if dotconfig.exists() and frag.exists() and frag.read_text() == text:
            return
        frag.write_text(text)
        self.log(f"configuring allnoconfig + fragment in {self.builddir}")
        self._make("allnoconfig", KCONFIG_ALLCONFIG=str(frag))
        bad = dropped_options(self.options, parse_dotconfig(dotconfig.read_text()))
        if bad:
            dotconfig.unlink()
            raise deps.ToolError(
                "allnoconfig dropped these fragment options (a dependency is missing or the "
                "option does not exist in this tree); add what they depend on to the fragment:\n  "
                + "\n  ".join(bad)
            )

    def build(self) -> Path:
        deps.check(deps.KERNEL_BUILD, "build the kernel")
        if not is_kernel_tree(self.src):
            raise deps.ToolError(f"{self.src} is not a Linux kernel tree (no Makefile / fs/erofs)")
        check_clean_tree(self.src)
        stamp = self.builddir / "stored-image"
        if self.pristine and stamp.exists() and Path(stamp.read_text()).exists():
            # An unpacked Debian package never changes: skip make's tree walk (~20 s).
            return Path(stamp.read_text())
        self.configure()
        start = time.monotonic()
        self.log(f"building {self.src} -> {self.builddir} with -j{self.jobs}")
        self._make("bzImage", progress=True)
        self.log(f"built in {time.monotonic() - start:.0f} s")
        image = self.store()
        if self.pristine:
            stamp.write_text(str(image))
        else:
            # Built from a tree given by path, maybe edited: the next default build runs make.
            stamp.unlink(missing_ok=True)
        return image

    def store(self) -> Path:
        """Keep the image by content, with its .config, so different trees never collide."""
        image = self.builddir / "arch/x86/boot/bzImage"
        digest = hashlib.sha256(image.read_bytes()).hexdigest()[:20]
        dest = cache_root() / "kernels" / digest
        if not (dest / "bzImage").exists():
            tmp = dest.with_name(digest + ".partial")
            tmp.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, tmp / "bzImage")
            shutil.copy2(self.builddir / ".config", tmp / "config")
            (tmp / "source").write_text(f"{self.src.resolve()}\nprofile={self.profile}\n")
            tmp.rename(dest)
        return dest / "bzImage"


def bzimage_release(path: Path) -> str | None:
    """The release string of an x86 bzImage ("6.1.192"): the setup header's kernel_version
    field (offset 0x20e) points, minus 0x200, at "<release> (<builder>) #1 ..."."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x8000)
    except OSError:
        return None
    if head[0x202:0x206] != b"HdrS":
        return None
    ptr = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    text = head[ptr:ptr + 200].split(b"\0", 1)[0].decode(errors="replace")
    return text.split(" ", 1)[0] or None


def ikconfig_from_bzimage(path: Path) -> dict[str, str] | None:
    """The .config embedded by CONFIG_IKCONFIG (like scripts/extract-ikconfig), or None.

    Only gzip-compressed bzImages (the x86 default) are searched; None means "unknown".
    """
    data = Path(path).read_bytes()
    start = 0
    while True:
        i = data.find(b"\x1f\x8b\x08", start)
        if i < 0:
            return None
        start = i + 1
        try:
            vmlinux = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[i:])
        except zlib.error:
            continue
        j = vmlinux.find(b"IKCFG_ST\x1f\x8b\x08")
        if j < 0:
            continue
        end = vmlinux.find(b"IKCFG_ED", j)
        try:
            return parse_dotconfig(gzip.decompress(vmlinux[j + 8 : end]).decode())
        except (OSError, EOFError):
            return None


def missing_required(config: dict[str, str], required: tuple[str, ...] = REQUIRED_OPTIONS["fscache"]) -> list[str]:
    return [o for o in required if config.get(o, "n") not in ("y", "m")]


def build_for(series: DebianKernel, src: Path | None = None, profile: str = "default",
              extra: list[Path] | None = None) -> KernelBuild:
    """The build of `src` (else Debian's tree for `series`) with the fragments `series` needs."""
    deps.check(deps.KERNEL_BUILD, "build the kernel")
    tree = Path(src).resolve() if src else fetch_debian_source(series.package, series.suites, log=KernelBuild.log)
    options = load_fragments(profile, list(extra or []), series, tree_version(tree), log=KernelBuild.log)
    return KernelBuild(src=tree, options=options, profile=profile, pristine=src is None)


def resolve_kernel(kernel: Path | None = None, src: Path | None = None, profile: str = "default",
                   version: str | None = None) -> Path:
    """The bzImage to test: the one given, or one built (or reused) from `src` / Debian's tree.
    What was given is checked first (validate.py): a wrong file or tree fails before any build."""
    if kernel is not None:
        return validate.check_bzimage(kernel, "--kernel")
    if src is not None:
        src = validate.check_kernel_tree(src, "--kernel-src")
    return build_for(choose_series(version, src), src, profile).build()
