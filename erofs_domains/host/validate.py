"""Bad input is refused first: the checks every tool and the suite's pytest options run on what
they are given, before anything is built, downloaded, pruned, created or booted.

Each check raises BadInput (a deps.ToolError, exit status 2) with one line that says what is
wrong and what would be right, in the words of the option that was given ("--kernel X: ...").
The tools print it as `<tool>: error: <line>`; conftest.py raises it as a pytest.UsageError.
Standard library only: the tools run on the distribution's Python, outside the test venv.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from erofs_domains.host.deps import ToolError

# The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst): "HdrS" at 0x202.
BZIMAGE_MAGIC = b"HdrS"
BZIMAGE_MAGIC_OFFSET = 0x202
BZIMAGE_HINT = "give an x86 bzImage (arch/x86/boot/bzImage of a build, or what tools/build-kernel prints)"


class BadInput(ToolError):
    """What a tool was given cannot work; nothing has been done yet."""

    exit_code = 2


def _named(option: str | None, value) -> str:
    return f"{option} {value}" if option else str(value)


def bzimage_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not an x86 bzImage (None when it is one): the boot header's magic, read
    from the first bytes only, so a wrong file fails here and not in qemu after the builds."""
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if p.is_dir():
        return "is a directory"
    try:
        with open(p, "rb") as f:
            head = f.read(BZIMAGE_MAGIC_OFFSET + len(BZIMAGE_MAGIC))
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if len(head) < BZIMAGE_MAGIC_OFFSET + len(BZIMAGE_MAGIC):
        return f"is not a bzImage ({p.stat().st_size} bytes: shorter than the x86 boot header)"
    if head[BZIMAGE_MAGIC_OFFSET:] != BZIMAGE_MAGIC:
        what = "an ELF file (vmlinux?)" if head[:4] == b"\x7fELF" else "not a bzImage"
        return f"is {what}: no x86 boot header ('HdrS' at offset 0x202)"
    return None


def check_bzimage(path: str | os.PathLike, option: str | None = "--kernel") -> Path:
    why = bzimage_problem(path)
    if why:
        raise BadInput(f"{_named(option, path)} {why}; {BZIMAGE_HINT}")
    return Path(path).resolve()


def check_dir(path: str | os.PathLike, option: str | None, want: str = "a directory") -> Path:
    """An existing directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInput(f"{_named(option, path)} does not exist; give {want}")
    if not p.is_dir():
        raise BadInput(f"{_named(option, path)} is not a directory; give {want}")
    return p.resolve()


def check_file(path: str | os.PathLike, option: str | None, want: str = "a file") -> Path:
    """An existing regular file (or a link to one)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInput(f"{_named(option, path)} does not exist; give {want}")
    if not p.is_file():
        raise BadInput(f"{_named(option, path)} is not a file; give {want}")
    return p.resolve()


def check_executable(path: str | os.PathLike, option: str | None, want: str = "an executable file") -> Path:
    p = check_file(path, option, want)
    if not os.access(p, os.X_OK):
        raise BadInput(f"{_named(option, path)} is not executable; give {want}")
    return p


def is_kernel_tree(src: str | os.PathLike) -> bool:
    """A Linux source tree the suite can build: its Makefile, Kconfig and fs/erofs/."""
    src = Path(src)
    return (src / "Makefile").is_file() and (src / "fs" / "erofs").is_dir() and (src / "Kconfig").is_file()


def check_kernel_tree(path: str | os.PathLike, option: str | None = "--src") -> Path:
    """A Linux source tree with fs/erofs (is_kernel_tree)."""
    want = "a Linux kernel source tree (with Makefile, Kconfig and fs/erofs/)"
    p = check_dir(path, option, want)
    if not is_kernel_tree(p):
        raise BadInput(f"{_named(option, path)} is not a Linux kernel tree (no Makefile, Kconfig or fs/erofs/); "
                       f"give {want}")
    return p


def check_erofs_utils_tree(path: str | os.PathLike, option: str | None = "--src") -> Path:
    want = "an erofs-utils source tree (with configure.ac and mkfs/)"
    p = check_dir(path, option, want)
    if not ((p / "configure.ac").is_file() and (p / "mkfs").is_dir()):
        raise BadInput(f"{_named(option, path)} is not an erofs-utils tree (no configure.ac or mkfs/); give {want}")
    return p


def check_git_tree(path: str | os.PathLike, option: str | None = "--src") -> Path:
    want = "a git work tree of the kernel (a clone, or a worktree of one)"
    p = check_dir(path, option, want)
    if not (p / ".git").exists():
        raise BadInput(f"{_named(option, path)} is not a git work tree (no .git); give {want}")
    return p


def check_output_dir(path: str | os.PathLike, option: str | None) -> Path:
    """A directory the tool may write into: an existing one, or a new one whose nearest existing
    ancestor is a writable directory.  Checked only; nothing is created here."""
    p = Path(path).expanduser().absolute()
    if p.exists():
        if not p.is_dir():
            raise BadInput(f"{_named(option, path)} is a file, not a directory; give a directory to write into")
        if not os.access(p, os.W_OK | os.X_OK):
            raise BadInput(f"{_named(option, path)} is not writable; give a directory you can write into")
        return p
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{_named(option, path)} cannot be created ({parent} is not a writable directory); "
                       "give a directory you can write into")
    return p


def check_new_file(path: str | os.PathLike, option: str | None) -> Path:
    """A file the tool will create or overwrite: its directory must exist and it must not be a directory."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise BadInput(f"{_named(option, path)} is a directory; give a file name")
    if not p.parent.is_dir():
        raise BadInput(f"{_named(option, path)}: the directory {p.parent} does not exist; "
                       "give a file in an existing directory")
    return p


def int_at_least(minimum: int, what: str = "a whole number"):
    """An argparse type: an int >= minimum ("--vms 0: want a whole number >= 1")."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; want {what} >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; want {what} >= {minimum}")
        return value

    return parse


def path(text: str) -> Path:
    """An argparse type for paths: an empty one (`--src ""`, an unset variable) is refused, not
    taken as the current directory (or, where the option is optional, as "not given")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a path")
    return Path(text).expanduser()


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value; give one, or leave the option out for the default")
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; want seconds > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0; want seconds > 0")
    return value


def env_value(name: str, default: str, parse) -> str:
    """An environment variable that gives an option's default, checked by the option's own parser:
    `EROFS_TEST_VMS=two` is refused at start, naming the variable, and not with a traceback."""
    text = os.environ.get(name) or default
    try:
        parse(text)
    except argparse.ArgumentTypeError as e:
        raise BadInput(f"${name}: {e}") from None
    return text


def _choice(*values: str):
    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(values)}")
        return text

    return parse


def _seconds_or_none(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or less: no bound)") from None


# The environment a VM run reads (README "Environment"): a typo there is as bad as one on the
# command line, and it surfaces late (a seed at the image build, an accelerator after the probe).
ENVIRONMENT = {
    "EROFS_TEST_SEED": int_at_least(0, "a whole number"),
    "EROFS_TEST_ACCEL": _choice("tcg", "kvm"),
    "EROFS_TEST_VM_LIFETIME": _seconds_or_none,
}


def check_environment() -> None:
    """Each of ENVIRONMENT that is set (and not empty) parses, and the run configuration reads the
    environment (erofs_domains/base/config.py); raises BadInput naming the variable."""
    from erofs_domains.base import config

    try:
        config.RunConfig.from_environment()
    except ValueError as e:
        raise BadInput(str(e)) from None
    for name, parse in ENVIRONMENT.items():
        if os.environ.get(name):
            env_value(name, "", parse)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line on one line (the usage is behind --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(tool: str, error: ToolError) -> int:
    """Print a refused input the one way every tool does; the exit status to return."""
    print(f"{tool}: error: {error}", file=sys.stderr)
    return error.exit_code
