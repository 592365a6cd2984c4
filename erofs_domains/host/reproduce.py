"""The one-line command that reruns a test the way this run ran it.

The controller computes the part every test shares (`run_prefix`) once, from the run
configuration as the user gave it (options and environment, before defaults such as the
kernel image and mkfs.erofs were resolved), and hands it to the guests in the configuration's
`reproduce`; a report appends the test's node id (`reproduce_command`)."""

import shlex
from pathlib import Path

from erofs_domains.base import config

# One test in one VM, from the venv `tox -e vm` made (`tox -e vm -- <test>` runs it too, but
# boots a VM per worker).
VM_RUNNER = [".tox/vm/bin/pytest", "--dist", "load", "--tx", "popen//python=tools/vm-python"]
DEFAULT_PROFILE = "default"


def _settings(given: config.RunConfig) -> list[str]:
    """Settings that change what a test does and have no option: the seed, the accelerator,
    the Hypothesis profile."""
    out = []
    if given.seed is not None:
        out.append(f"EROFS_TEST_SEED={given.seed}")
    if given.accel:
        out.append(f"EROFS_TEST_ACCEL={given.accel}")
    if given.hypothesis_profile:
        out.append(f"HYPOTHESIS_PROFILE={given.hypothesis_profile}")
    return out


def run_prefix(given: config.RunConfig, mode: str) -> list[str]:
    """The command up to the node id. `given`: the run configuration before resolution;
    `mode`: "vm" (tests in VMs), "host" (--host-mode) or "controller" (tests/host)."""
    args: list[str] = []
    if mode in ("vm", "controller"):
        if given.kernel:
            args += ["--kernel", str(Path(given.kernel).resolve())]
        elif given.kernel_src:
            args += ["--kernel-src", str(Path(given.kernel_src).resolve())]
        if given.kernel_version and not given.kernel:
            args += ["--kernel-version", given.kernel_version]
        if given.kernel_profile != DEFAULT_PROFILE and not given.kernel:
            args += ["--kernel-profile", given.kernel_profile]
    if given.mkfs:
        args += ["--mkfs", str(Path(given.mkfs).resolve())]
    elif given.erofs_utils_src:
        args += ["--erofs-utils-src", str(Path(given.erofs_utils_src).resolve())]
    if given.require_features:
        args.append("--require-features")
    if given.test_timeout != config.DEFAULT_TIMEOUT:
        args += ["--test-timeout", f"{float(given.test_timeout):g}"]
    runner = {"vm": VM_RUNNER, "host": ["pytest", "--host-mode"], "controller": ["pytest"]}[mode]
    settings = _settings(given)
    return ["env", *settings, *runner, *args] if settings else [*runner, *args]


def reproduce_command(prefix: str, nodeid: str) -> str:
    """`prefix` as the configuration's `reproduce` holds it (shell words)."""
    return f"{prefix} {shlex.quote(nodeid)}" if prefix else shlex.quote(nodeid)
