"""Build and run dependencies: check them and name the Debian packages that provide them."""

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Dep:
    what: str  # a command name, or an absolute header path
    package: str  # the Debian package that provides it

    def present(self) -> bool:
        if self.what.startswith("/"):
            return Path(self.what).exists()
        return shutil.which(self.what) is not None


KERNEL_BUILD = (
    Dep("gcc", "gcc"),
    Dep("make", "make"),
    Dep("flex", "flex"),
    Dep("bison", "bison"),
    Dep("bc", "bc"),
    Dep("perl", "perl"),
    Dep("xz", "xz-utils"),
    Dep("/usr/include/libelf.h", "libelf-dev"),
    Dep("/usr/include/openssl/opensslv.h", "libssl-dev"),
)

VM_RUN = (
    Dep("qemu-system-x86_64", "qemu-system-x86"),
    # Without udev, vng loses the guest command's output and exits 255.
    Dep("udevadm", "udev"),
)


class ToolError(Exception):
    """An error a tool reports as one paragraph, exiting with `exit_code`."""

    exit_code = 2


class MissingDependency(ToolError):
    def __init__(self, purpose: str, missing: list[Dep]):
        pkgs = " ".join(sorted({d.package for d in missing}))
        whats = ", ".join(d.what for d in missing)
        super().__init__(
            f"cannot {purpose}: missing {whats}. "
            f"Install the Debian packages with: apt-get install {pkgs}"
        )


def check(deps, purpose: str) -> None:
    missing = [d for d in deps if not d.present()]
    if missing:
        raise MissingDependency(purpose, missing)
