"""The run's settings, resolved once: the one module that reads the environment for them.

The controller (conftest.py) builds the configuration from pytest's options, the environment
and the defaults below, resolves what it can (the kernel image, the erofs-utils under test,
the seed) and installs it; installing writes it to this process's environment, which every
child inherits: xdist workers, the VM wrapper (tools/vm-python forwards `environment()` into
the guest), daemons and blob servers. Every other process reads it once, from there, on first
use of `current()`. A tool run by hand (tools/vm-run, tools/build-kernel) reads the same names.

The variables are the suite's public interface (README: EROFS_TEST_*, and erofs-utils' own
MKFS_EROFS/DUMP_EROFS/FSCK_EROFS); `FIELDS` maps each to its setting.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.base.layout import REPO

DEFAULT_WORK = Path("/tmp/erofs-fscache-tests")  # short: Unix socket paths there must fit in 108 bytes
DEFAULT_TIMEOUT = 120.0
DEFAULT_LIFETIME = 4 * 3600.0
DEFAULT_SEED = 1


@dataclass(frozen=True)
class RunConfig:
    results: Path = REPO / "results"  # per-test artifacts, console logs, reports
    cache: Path | None = None  # builds, sources, images; None: $XDG_CACHE_HOME/erofs-fscache-tests
    work: Path = DEFAULT_WORK  # scratch in the machine under test
    kernel: Path | None = None  # the bzImage under test, once resolved
    kernel_src: Path | None = None
    kernel_version: str | None = None  # a series of host.kernel_build.KERNELS; None: its default
    kernel_profile: str = "default"
    mkfs: str | None = None  # the erofs-utils under test, once resolved (dump/fsck beside it)
    dump: str | None = None
    fsck: str | None = None
    erofs_utils_src: Path | None = None
    erofs_utils_configure_flags: str = ""
    require_features: bool = False  # a test whose kernel feature is missing fails, not skips
    seed: int | None = None  # image content seed; None: DEFAULT_SEED
    test_timeout: float = DEFAULT_TIMEOUT
    accel: str | None = None  # "tcg" or "kvm"; None: probe
    vm_lifetime: float = DEFAULT_LIFETIME
    probe: bool = True  # boot once to read the guest's features before the workers start
    feature_probes: bool = True  # in that boot, probe what the kernel can say (erofs_domains/guest/kernel_probes.py)
    daemon_spawn: str = ""  # "exec": start each daemon as a fresh interpreter
    python: str | None = None  # the controller's interpreter, which the guests run
    reproduce: str = ""  # the command prefix that reruns a test the way this run ran it
    in_vm: bool = False
    vm_state: Path | None = None  # where the guest tells its wrapper which test runs
    hypothesis_profile: str | None = None
    ci: bool = False

    @property
    def cache_root(self) -> Path:
        if self.cache is not None:
            return self.cache
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "erofs-fscache-tests"

    @property
    def image_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def environment(self) -> dict[str, str]:
        """The variables that carry this configuration to a child process (set ones only)."""
        out = {}
        for name, (field, _) in FIELDS.items():
            value = getattr(self, field)
            if value is None or value == "" or value is False or name in ALIASES:
                continue
            out[name] = "1" if value is True else "0" if value is False else str(value)
        if not self.probe:
            out["EROFS_TEST_PROBE"] = "0"
        if not self.feature_probes:
            out["EROFS_TEST_PROBES"] = "0"
        return out

    @classmethod
    def from_environment(cls, environ=None) -> RunConfig:
        environ = os.environ if environ is None else environ
        values = {}
        for name, (field, parse) in FIELDS.items():
            raw = environ.get(name)
            if raw not in (None, "") and field not in values:
                try:
                    values[field] = parse(raw)
                except ValueError:  # one line naming the variable (tools/erofs_domains.host.validate)
                    want = {int: "a whole number", float: "a number"}.get(parse, "a valid value")
                    raise ValueError(f"${name}={raw!r} is not {want}; fix or unset it") from None
        return cls(**values)


def _path(s: str) -> Path:
    return Path(s)


def _flag(s: str) -> bool:
    return s not in ("0", "false", "no", "")


# variable -> (setting, parser). The first of two names for one setting wins.
FIELDS: dict[str, tuple[str, object]] = {
    "EROFS_TEST_RESULTS": ("results", _path),
    "EROFS_TEST_CACHE": ("cache", _path),
    "EROFS_TEST_WORK": ("work", _path),
    "EROFS_TEST_KERNEL": ("kernel", _path),
    "EROFS_TEST_KERNEL_SRC": ("kernel_src", _path),
    "EROFS_TEST_KERNEL_VERSION": ("kernel_version", str),
    "EROFS_TEST_KERNEL_PROFILE": ("kernel_profile", str),
    "MKFS_EROFS": ("mkfs", str),
    "DUMP_EROFS": ("dump", str),
    "FSCK_EROFS": ("fsck", str),
    "EROFS_TEST_EROFS_UTILS_SRC": ("erofs_utils_src", _path),
    "EROFS_UTILS_CONFIGURE_FLAGS": ("erofs_utils_configure_flags", str),
    "EROFS_TEST_REQUIRE_FEATURES": ("require_features", _flag),
    "EROFS_TEST_STRICT": ("require_features", _flag),  # the older name, still read
    "EROFS_TEST_SEED": ("seed", int),
    "EROFS_TEST_TIMEOUT": ("test_timeout", float),
    "EROFS_TEST_ACCEL": ("accel", str),
    "EROFS_TEST_VM_LIFETIME": ("vm_lifetime", float),
    "EROFS_TEST_PROBE": ("probe", _flag),
    "EROFS_TEST_PROBES": ("feature_probes", _flag),
    "EROFS_TEST_DAEMON_SPAWN": ("daemon_spawn", str),
    "EROFS_TEST_PYTHON": ("python", str),
    "EROFS_TEST_REPRODUCE": ("reproduce", str),
    "EROFS_TEST_IN_VM": ("in_vm", _flag),
    "EROFS_TEST_VM_STATE": ("vm_state", _path),
    "HYPOTHESIS_PROFILE": ("hypothesis_profile", str),
    "CI": ("ci", _flag),
}
ALIASES = frozenset({"EROFS_TEST_STRICT"})

_current: RunConfig | None = None


def current() -> RunConfig:
    """This process's configuration (read from the environment on first use)."""
    global _current
    if _current is None:
        _current = RunConfig.from_environment()
    return _current


def install(config: RunConfig) -> RunConfig:
    """Make `config` this process's configuration and its children's (the environment they
    inherit): what the controller does once it has resolved a setting."""
    global _current
    for name in FIELDS:
        os.environ.pop(name, None)
    os.environ.update(config.environment())
    _current = config
    return config


def update(**changes) -> RunConfig:
    return install(current().replace(**changes))


def forget() -> None:
    """Read the environment again on next use (tests of this module)."""
    global _current
    _current = None
