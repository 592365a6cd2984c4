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

from . import deps
from .paths import KCONFIG_DIR, cache_root

# `git bisect run` skips a revision when the script exits 125.
EXIT_TREE_DOES_NOT_BUILD = 125
DEFAULT_PACKAGE = "linux-source-6.12"
DEFAULT_SUITE = "trixie"
PROFILES = {
    "default": ["ondemand.config"],
    "debug": ["ondemand.config", "debug.config"],
    # 7.0+: page-cache sharing (tests/pagecache); no fscache options (7.2 removed the backend).
    "pagecache": ["pagecache.config"],
}
# What the suite cannot run without; used to name missing options for a foreign bzImage.
REQUIRED_OPTIONS = (
    "CONFIG_EROFS_FS",
    "CONFIG_EROFS_FS_ONDEMAND",
    "CONFIG_CACHEFILES",
    "CONFIG_CACHEFILES_ONDEMAND",
    "CONFIG_FSCACHE",
    "CONFIG_FSCACHE_STATS",
    "CONFIG_EXT4_FS",
    "CONFIG_BLK_DEV_LOOP",
    "CONFIG_IKCONFIG_PROC",
)


class BuildFailed(deps.ToolError):
    exit_code = EXIT_TREE_DOES_NOT_BUILD


def parse_fragment(text: str) -> dict[str, str]:
    """Fragment lines `CONFIG_X=v  # why` and `# CONFIG_X is not set` -> {name: value}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"#\s*(CONFIG_\w+) is not set", line.strip())
        if m:
            out[m.group(1)] = "n"
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, value = line.partition("=")
        out[name.strip()] = value.strip()
    return out


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


def load_fragments(profile: str, extra: list[Path]) -> dict[str, str]:
    if profile not in PROFILES:
        raise deps.ToolError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    options: dict[str, str] = {}
    for path in [KCONFIG_DIR / f for f in PROFILES[profile]] + list(extra):
        if not Path(path).is_file():
            raise deps.ToolError(f"config fragment {path} does not exist")
        options.update(parse_fragment(Path(path).read_text()))
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
    return (src / "Makefile").is_file() and (src / "fs" / "erofs").is_dir() and (src / "Kconfig").is_file()


def fetch_debian_source(package: str = DEFAULT_PACKAGE, suite: str = DEFAULT_SUITE, log=print) -> Path:
    """Download and unpack Debian's linux-source package through a private apt configuration."""
    from .debian import PrivateApt

    apt = PrivateApt(cache_root() / "apt")
    apt.update([suite])
    deb = Path(apt.download_binary(package))
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
    r = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True)
    if r.returncode:
        raise deps.ToolError(f"cannot unpack {deb}: {r.stderr.strip()[-500:]}")
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
        cmd = ["make", "-C", str(self.src), f"O={self.builddir}", "ARCH=x86_64", f"-j{self.jobs}", *targets]
        proc_env = dict(os.environ, **env)
        if not progress:
            r = subprocess.run(cmd, env=proc_env, capture_output=True, text=True)
            if r.returncode:
                raise BuildFailed(f"`{' '.join(cmd)}` failed:\n{(r.stdout + r.stderr)[-3000:]}")
            return
        # Stream `make` and show a one-line progress: how many objects, which one now.
        tail: list[str] = []
        n = 0
        start = time.monotonic()
        tty = sys.stderr.isatty()
        with subprocess.Popen(cmd, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
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
                f"the kernel tree {self.src} does not build (make exited {rc}); exit status "
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


def missing_required(config: dict[str, str]) -> list[str]:
    return [o for o in REQUIRED_OPTIONS if config.get(o, "n") not in ("y", "m")]


def resolve_kernel(kernel: Path | None = None, src: Path | None = None, profile: str = "default") -> Path:
    """The bzImage to test: the one given, or one built (or reused) from `src` / Debian's tree."""
    if kernel is not None:
        if not Path(kernel).is_file():
            raise deps.ToolError(f"--kernel {kernel} does not exist")
        return Path(kernel).resolve()
    deps.check(deps.KERNEL_BUILD, "build the kernel")
    tree = Path(src).resolve() if src else fetch_debian_source(log=KernelBuild.log)
    return KernelBuild(src=tree, options=load_fragments(profile, []), profile=profile, pristine=src is None).build()
