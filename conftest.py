"""Suite entry point: the host-side controller (kernel, erofs-utils, VM workers) and the
run configuration it resolves once; the fixtures are in fixtures/ (the pytest plugin).

Two ways to run tests/fscache:
  VM mode   pytest --dist load --tx 2*popen//python=tools/vm-python tests/fscache
            The controller (this process) builds or reuses the kernel and erofs-utils, then
            pytest-xdist starts each worker inside its own VM on that kernel.
  host mode pytest --host-mode tests/fscache   (root, on a kernel that has the features)
"""

import compileall
import copy
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
from tabulate import tabulate

from erofs_domains.base import config as run_config
from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.layout import REPO
from erofs_domains.guest import kernel_features
from erofs_domains.guest.fscache import image_set
from erofs_domains.guest.images import ImageFactory, image_cache_dir
from erofs_domains.host import cachegc, deps, erofs_utils_build, features_probe, kernel_build, legs, reproduce
from fixtures.requirements import FLAG, features_required

pytest_plugins = ["fixtures.record", "fixtures.plugin"]


def is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def vm_mode(config) -> bool:
    return legs.vm_workers(config.getoption("tx", None)) > 0


def given_configuration(config) -> run_config.RunConfig:
    """The run configuration as the user gave it: the options over the environment."""
    env = run_config.current()
    opt = config.getoption
    return env.replace(
        results=Path(opt("results")).resolve(), kernel=opt("kernel"), kernel_src=opt("kernel_src"),
        kernel_version=opt("kernel_version"), kernel_profile=opt("kernel_profile"),
        mkfs=opt("mkfs") or env.mkfs, erofs_utils_src=opt("erofs_utils_src") or env.erofs_utils_src,
        require_features=opt("require_features"), test_timeout=opt("test_timeout"))


def resolve_mkfs(config):
    """The erofs-utils under test, named once per run: --mkfs or MKFS_EROFS (used as it is;
    nothing is built or downloaded), else --erofs-utils-src (that tree, built), else Debian's.
    The run configuration gets its three binaries, so every tool, image, worker and VM of the
    run uses exactly these.  Raises deps.ToolError (also for a release the suite does not
    support, erofs_domains/base/erofs_tools.py UNSUPPORTED, under --require-features; else it
    warns)."""
    utils = getattr(config, "_erofs_utils", None)
    if utils is None:
        utils = erofs_utils_build.resolve(config.getoption("mkfs"), config.getoption("erofs_utils_src"))
        run_config.update(mkfs=utils.mkfs, dump=utils.dump or None, fsck=utils.fsck or None)
        config._erofs_utils = utils
        reason = utils.tools().why_unsupported()
        if reason and features_required():
            raise erofs_utils_build.BuildError(f"{FLAG}: {reason}")
        if reason:
            print(f"erofs-fscache: warning: {reason}", file=sys.stderr)
    return utils


@pytest.fixture(scope="session")
def erofs_utils(pytestconfig):
    """The erofs-utils under test (resolve_mkfs) for tests outside a VM run, resolved on first
    use; skips (fails under --require-features) when there is none to test."""
    try:
        utils = resolve_mkfs(pytestconfig)  # --require-features: raises for an unsupported release too
    except deps.ToolError as e:
        if features_required():
            pytest.fail(str(e) if str(e).startswith(FLAG) else f"{FLAG}: no erofs-utils to test: {e}",
                        pytrace=False)
        pytest.skip(f"no erofs-utils to test: {e}")
    reason = utils.tools().why_unsupported()
    if reason:
        pytest.skip(reason)
    return utils


@pytest.fixture(scope="session")
def require_tool(erofs_utils):
    """`require_tool("dump --cat")`: when the erofs-utils under test predates the feature
    (erofs_domains/base/erofs_tools.py TOOL_FEATURES), skip naming the release it needs (fail
    under --require-features)."""

    def check(feature: str) -> None:
        reason = erofs_utils.tools().why_not(feature)
        if reason and features_required():
            pytest.fail(f"{FLAG}: {reason}", pytrace=False)
        if reason:
            pytest.skip(reason)

    return check


def prebuild_images() -> None:
    """Build the VM tests' images here, natively, before the VMs start (see image_set.py)."""
    start = time.monotonic()
    run = run_config.update(seed=run_config.current().image_seed)  # the guests use the seed built here
    small = ImageFactory(image_cache_dir(), run.mkfs, seed=run.image_seed)
    tiny = copy.copy(small)
    tiny.profile = "tiny"
    n = image_set.prebuild(small, tiny)
    print(f"erofs-fscache: {n} images ready in {time.monotonic() - start:.0f} s", file=sys.stderr)


def prune_cache() -> None:
    """Old launch scripts, kernels, build dirs and images go at every session start
    (erofs_domains/host/cachegc.py; `tools/cache` shows them)."""
    removed = cachegc.prune(cache_root())
    if removed:
        print("erofs-fscache: pruned the cache: " + ", ".join(f"{n} {k}" for k, n in removed.items())
              + " (tools/cache --list)", file=sys.stderr)


def select_leg(config):
    """Every process of a leg (controller, xdist workers, guests) narrows its arguments alike."""
    leg = config.getoption("leg")
    if not leg:
        return
    named = list(config.args) if config.args_source == pytest.Config.ArgsSource.ARGS else None
    config.args = legs.select(leg, named, REPO)
    if not config.args:
        pytest.exit(legs.nothing_selected(leg, named), returncode=pytest.ExitCode.OK)


def collect_only(config) -> bool:
    """`pytest --collect-only` names the tests and nothing else: no kernel or erofs-utils is
    resolved, built or booted for it (tools/bisect checks a test id this way)."""
    return bool(config.getoption("collectonly", False))


def resolve_kernel(config) -> Path:
    return kernel_build.resolve_kernel(config.getoption("kernel"), config.getoption("kernel_src"),
                                       config.getoption("kernel_profile"), config.getoption("kernel_version"))


def pytest_configure(config):
    select_leg(config)
    if is_worker(config) or run_config.current().in_vm:
        return  # the controller resolved the run configuration; this process reads it
    mode = "vm" if vm_mode(config) else "host" if config.getoption("host_mode") else "controller"
    given = given_configuration(config)
    # Before any default is resolved: the reproduce line names what the user chose.
    run_config.install(given.replace(reproduce=shlex.join(reproduce.run_prefix(given, mode))))
    if collect_only(config):
        return
    if vm_mode(config):
        prune_cache()
        if config.getoption("maxworkerrestart", None) is None:
            # xdist restarts crashed --tx workers without limit (with -n: 4 per worker);
            # a kernel that oopses in every test would boot a VM per test. Under -x a
            # crash is the first failure: xdist would still start a new VM, give it
            # tests, and stop only when that one crashed too.
            restarts = 0 if config.getoption("maxfail", 0) == 1 else 4 * legs.vm_workers(config.getoption("tx"))
            config.option.maxworkerrestart = str(restarts)
    try:
        if config.getoption("host_mode"):
            resolve_mkfs(config)
        elif not vm_mode(config) and any(legs.owns("host", str(a), REPO) for a in config.args):
            # Tests that boot VMs of their own from here (tests/host): they need the kernel only.
            resolve_mkfs(config)
            run_config.update(kernel=resolve_kernel(config))
        elif vm_mode(config):
            resolve_mkfs(config)
            image = resolve_kernel(config)
            deps.check(deps.VM_RUN, "boot the test kernel")  # here too: the probe may be cached
            # The guest cannot write byte code (its view of this tree is read-only): compile here.
            for d in ("erofs_domains", "fixtures", "tests"):
                compileall.compile_dir(REPO / d, quiet=1)
            run_config.update(kernel=image, python=sys.executable)
            prebuild_images()
            run_config.current().results.mkdir(parents=True, exist_ok=True)
            config._erofs_guest = features_probe.probe_guest(image)
    except deps.ToolError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config):
    run = run_config.current()
    required = f"{FLAG}: {'on' if run.require_features else 'off'}"
    guest = getattr(config, "_erofs_guest", None)
    if guest:
        rows = guest["table"]
        how = f"probed in a VM earlier: {guest['cached']}" if guest.get("cached") else "probed in a VM"
        series = run.kernel_version or f"{kernel_build.DEFAULT_KERNEL_VERSION} (default) or the tree's own"
        title = f"test kernel {run.kernel}, --kernel-version {series} ({how})"
    elif vm_mode(config) and not is_worker(config):
        return [f"test kernel {run.kernel} (features not probed: EROFS_TEST_PROBE=0)", required]
    elif not is_worker(config):
        rows = kernel_features.detect(run.mkfs).table()
        title = "this machine's kernel" + (" (inside the VM)" if run.in_vm else "")
    else:
        return None
    return [title, tabulate(rows, headers=["feature", "value"], tablefmt="simple"), required]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """A leg whose tests `-k`/`-m` all deselected ran nothing it was asked for: that passes."""
    if session.config.getoption("leg") and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and not is_worker(
            session.config):
        session.exitstatus = pytest.ExitCode.OK
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"--leg {session.config.getoption('leg')}: every test deselected; "
                                "nothing to run in this leg")


def pytest_collection_finish(session):
    """Host mode needs an explicit opt-in: it binds cachefiles and mounts on this machine."""
    config = session.config
    if is_worker(config) or run_config.current().in_vm or collect_only(config):
        return
    suites = {s for s in legs.LEGS["vm"] for item in session.items if item.nodeid.startswith(s + "/")}
    if not suites:
        return
    if not config.getoption("host_mode"):
        paths = sorted(suites)
        mkfs = ["--mkfs", config.getoption("mkfs")] if config.getoption("mkfs") else []
        tox = shlex.join(["tox", "-e", "vm", "--", *mkfs, *paths])
        vm = shlex.join(["pytest", "--dist", "load", "--tx", "2*popen//python=tools/vm-python", *mkfs, *paths])
        pytest.exit(
            f"{' and '.join(paths)} need{'s' if len(paths) == 1 else ''} a kernel with EROFS on-demand (fscache) "
            f"or page-cache sharing support. Run {'it' if len(paths) == 1 else 'them'} in VMs (`{tox}`, or `{vm}`), "
            "or on a disposable root machine whose kernel has the features with --host-mode.",
            returncode=4,
        )
    f = kernel_features.detect(run_config.current().mkfs)
    reason = f.why_no_ondemand() if "tests/fscache" in suites else f.why_no_pagecache_share()
    if os.geteuid() != 0 or reason:
        pytest.exit(f"--host-mode refused: {reason or 'not root'}", returncode=4)
