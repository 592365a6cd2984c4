"""Suite entry point: the host-side controller (kernel, erofs-utils, VM workers),
and the fixture library in fixtures/plugin.py.

Two ways to run tests/fscache:
  VM mode   pytest --dist load --tx 2*popen//python=tools/vm-python tests/fscache
            The controller (this process) builds or reuses the kernel and erofs-utils, then
            pytest-xdist starts each worker inside its own VM on that kernel.
  host mode pytest --host-mode tests/fscache   (root, on a kernel that has the features)
"""

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tools"))

from vmtest import legs  # noqa: E402

from fixtures.kernel import strict_mode  # noqa: E402
from fixtures.process_utils import cmd  # noqa: E402

pytest_plugins = ["fixtures.record", "fixtures.plugin"]


def in_vm() -> bool:
    return os.environ.get("EROFS_TEST_IN_VM") == "1"


def is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def vm_mode(config) -> bool:
    return any("vm-python" in tx for tx in (config.getoption("tx", None) or []))


def resolve_mkfs(config):
    """The erofs-utils under test, named once per run: --mkfs or MKFS_EROFS (used as it is;
    nothing is built or downloaded), else --erofs-utils-src (that tree, built), else Debian's.
    Exports MKFS_EROFS, DUMP_EROFS and FSCK_EROFS, so every tool, image, worker and VM of the
    run uses exactly these binaries.  Raises deps.ToolError (also for a release the suite does
    not support, fixtures/erofs_tools.py UNSUPPORTED, in strict mode; else it warns)."""
    utils = getattr(config, "_erofs_utils", None)
    if utils is None:
        from vmtest import erofs_utils

        utils = erofs_utils.resolve(config.getoption("mkfs"), config.getoption("erofs_utils_src"))
        for var in erofs_utils.ENV_NAMES.values():  # no dump/fsck of another erofs-utils stays
            os.environ.pop(var, None)
        os.environ.update(utils.env())
        config._erofs_utils = utils
        reason = utils.tools().why_unsupported()
        if reason and strict_mode(config):
            raise erofs_utils.BuildError(f"--strict: {reason}")
        if reason:
            print(f"erofs-fscache: warning: {reason}", file=sys.stderr)
    return utils


@pytest.fixture(scope="session")
def erofs_utils(pytestconfig):
    """The erofs-utils under test (resolve_mkfs) for tests outside a VM run, resolved on first
    use; skips (fails in strict mode) when there is none to test."""
    from vmtest import deps

    try:
        utils = resolve_mkfs(pytestconfig)  # strict mode: raises for an unsupported release too
    except deps.ToolError as e:
        if strict_mode(pytestconfig):
            pytest.fail(str(e) if str(e).startswith("--strict") else f"--strict: no erofs-utils to test: {e}",
                        pytrace=False)
        pytest.skip(f"no erofs-utils to test: {e}")
    reason = utils.tools().why_unsupported()
    if reason:
        pytest.skip(reason)
    return utils


@pytest.fixture(scope="session")
def require_tool(erofs_utils, pytestconfig):
    """`require_tool("dump --cat")`: when the erofs-utils under test predates the feature
    (fixtures/erofs_tools.py TOOL_FEATURES), skip naming the release it needs (fail in strict
    mode)."""

    def check(feature: str) -> None:
        reason = erofs_utils.tools().why_not(feature)
        if reason and strict_mode(pytestconfig):
            pytest.fail(f"--strict: {reason}", pytrace=False)
        if reason:
            pytest.skip(reason)

    return check


def prebuild_images() -> None:
    """Build the VM tests' images here, natively, before the VMs start (see image_set.py)."""
    import copy
    import time

    from fixtures.images import ImageFactory
    from fixtures.plugin import image_cache_dir, image_seed
    from tests.fscache import image_set

    start = time.monotonic()
    os.environ["EROFS_TEST_SEED"] = str(image_seed())  # the guests use the seed built here
    small = ImageFactory(image_cache_dir(), os.environ["MKFS_EROFS"], seed=image_seed())
    tiny = copy.copy(small)
    tiny.profile = "tiny"
    n = image_set.prebuild(small, tiny)
    print(f"erofs-fscache: {n} images ready in {time.monotonic() - start:.0f} s", file=sys.stderr)


def probe_key(kernel: Path) -> str:
    """What a probe's answer depends on: the kernel image, the probe's code, the mkfs binary."""
    h = hashlib.sha256(Path(kernel).read_bytes())
    h.update((REPO / "fixtures" / "kernel.py").read_bytes())
    h.update((REPO / "fixtures" / "probes.py").read_bytes())
    h.update(os.environ.get("EROFS_TEST_PROBES", "").encode())  # 0: the ranges alone decide
    mkfs = os.environ.get("MKFS_EROFS", "")
    if mkfs and os.path.exists(mkfs):
        from fixtures import erofs_tools

        h.update(f"{os.path.realpath(mkfs)} {erofs_tools.identity(mkfs)}".encode())
    return h.hexdigest()[:24]


def probe_guest(kernel: Path) -> dict | None:
    """Boot once and read the guest's features (also proves the kernel boots). The answer is
    kept per (kernel image, probe code, mkfs): the next run of the same kernel starts its
    workers without this extra boot (~10 s under TCG)."""
    from vmtest.paths import cache_root

    if os.environ.get("EROFS_TEST_PROBE") == "0":  # tools/compare-kernels, tools/bisect: one boot less
        return None
    saved = cache_root() / "probes" / f"{probe_key(kernel)}.json"
    if saved.exists():
        guest = json.loads(saved.read_text())
        guest["cached"] = str(saved)
        return guest
    argv = [sys.executable, str(REPO / "tools" / "vm-run"), "--kernel", str(kernel), "--",
           sys.executable, "-m", "fixtures.kernel", os.environ.get("MKFS_EROFS", "")]
    r = cmd(argv, check=False, cwd=REPO, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            guest = json.loads(line)
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(guest))
            tmp.replace(saved)
            return guest
    raise pytest.UsageError(
        f"the test kernel {kernel} did not boot or run Python (exit {r.returncode}).\n"
        f"command: {shlex.join(argv)}\n{r.stderr[-3000:]}"
    )


def prune_cache() -> None:
    """Old launch scripts, kernels, build dirs and images go at every session start
    (tools/vmtest/cachegc.py; `tools/cache` shows them)."""
    from vmtest import cachegc
    from vmtest.paths import cache_root

    removed = cachegc.prune(cache_root())
    if removed:
        print("erofs-fscache: pruned the cache: " + ", ".join(f"{n} {k}" for k, n in removed.items())
              + " (tools/cache --list)", file=sys.stderr)


def worker_count(config) -> int:
    return sum(int(tx.split("*", 1)[0]) if "*" in tx else 1 for tx in (config.getoption("tx", None) or []))


def select_leg(config):
    """Every process of a leg (controller, xdist workers, guests) narrows its arguments alike."""
    leg = config.getoption("leg")
    if not leg:
        return
    named = list(config.args) if config.args_source == pytest.Config.ArgsSource.ARGS else None
    config.args = legs.select(leg, named, REPO)
    if not config.args:
        pytest.exit(legs.nothing_selected(leg, named), returncode=pytest.ExitCode.OK)


def pytest_configure(config):
    select_leg(config)
    results = config.getoption("results") or Path(os.environ.get("EROFS_TEST_RESULTS") or REPO / "results")
    os.environ["EROFS_TEST_RESULTS"] = str(Path(results).resolve())
    if not (is_worker(config) or in_vm()):
        # Before any default is resolved: the reproduce line names what the user chose.
        from fixtures import reproduce

        mode = "vm" if vm_mode(config) else "host" if config.getoption("host_mode") else "controller"
        os.environ[reproduce.ENV] = shlex.join(reproduce.config_prefix(config, mode))
        if vm_mode(config):
            prune_cache()
            if config.getoption("maxworkerrestart", None) is None:
                # xdist restarts crashed --tx workers without limit (with -n: 4 per worker);
                # a kernel that oopses in every test would boot a VM per test. Under -x a
                # crash is the first failure: xdist would still start a new VM, give it
                # tests, and stop only when that one crashed too.
                restarts = 0 if config.getoption("maxfail", 0) == 1 else 4 * worker_count(config)
                config.option.maxworkerrestart = str(restarts)
    if strict_mode(config):
        os.environ["EROFS_TEST_STRICT"] = "1"
    if is_worker(config) or in_vm():
        return
    if config.getoption("host_mode"):
        from vmtest import deps

        try:
            resolve_mkfs(config)
        except deps.ToolError as e:
            raise pytest.UsageError(str(e)) from None
    if not vm_mode(config) and any(legs.owns("host", str(a), REPO) for a in config.args):
        # Tests that boot VMs of their own from here (tests/host): they need the kernel only.
        from vmtest import deps, kernel

        try:
            resolve_mkfs(config)
            os.environ["EROFS_TEST_KERNEL"] = str(kernel.resolve_kernel(
                config.getoption("kernel"), config.getoption("kernel_src"), config.getoption("kernel_profile"),
                config.getoption("kernel_version")))
        except deps.ToolError as e:
            raise pytest.UsageError(str(e)) from None
        return
    if vm_mode(config):
        from vmtest import deps, kernel

        try:
            resolve_mkfs(config)
            image = kernel.resolve_kernel(config.getoption("kernel"), config.getoption("kernel_src"),
                                          config.getoption("kernel_profile"), config.getoption("kernel_version"))
            deps.check(deps.VM_RUN, "boot the test kernel")  # here too: the probe may be cached
        except deps.ToolError as e:
            raise pytest.UsageError(str(e)) from None
        # The guest cannot write byte code (its view of this tree is read-only): compile here.
        import compileall

        for d in ("fixtures", "tests", "tools/vmtest"):
            compileall.compile_dir(REPO / d, quiet=1)
        os.environ["EROFS_TEST_KERNEL"] = str(image)
        prebuild_images()
        os.environ["EROFS_TEST_PYTHON"] = sys.executable
        Path(os.environ["EROFS_TEST_RESULTS"]).mkdir(parents=True, exist_ok=True)
        config._erofs_guest = probe_guest(image)


def pytest_report_header(config):
    from tabulate import tabulate

    guest = getattr(config, "_erofs_guest", None)
    if guest:
        rows = guest["table"]
        how = f"probed in a VM earlier: {guest['cached']}" if guest.get("cached") else "probed in a VM"
        series = config.getoption("kernel_version") or "the tree's own / the default"
        title = f"test kernel {os.environ.get('EROFS_TEST_KERNEL')}, --kernel-version {series} ({how})"
    elif vm_mode(config) and not is_worker(config):
        return [f"test kernel {os.environ.get('EROFS_TEST_KERNEL')} (features not probed: EROFS_TEST_PROBE=0)",
                f"strict mode: {'on' if strict_mode(config) else 'off'}"]
    elif not is_worker(config):
        from fixtures import kernel as fk

        rows = fk.detect(os.environ.get("MKFS_EROFS")).table()
        title = "this machine's kernel" + (" (inside the VM)" if in_vm() else "")
    else:
        return None
    return [title, tabulate(rows, headers=["feature", "value"], tablefmt="simple"),
            f"strict mode: {'on' if strict_mode(config) else 'off'}"]


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
    if is_worker(config) or in_vm():
        return
    suites = {s for s in legs.LEGS["vm"] for item in session.items if s in item.nodeid}
    if not suites:
        return
    if not config.getoption("host_mode"):
        pytest.exit(
            f"{' and '.join(sorted(suites))} need(s) a kernel with EROFS on-demand (fscache) or page-cache "
            "sharing support. Run it in VMs "
            "(`tox -e vm`, or `pytest --dist load --tx 2*popen//python=tools/vm-python tests/pagecache`), "
            "or on a disposable root machine whose kernel has the features with --host-mode.",
            returncode=4,
        )
    from fixtures import kernel as fk

    f = fk.detect(os.environ.get("MKFS_EROFS"))
    reason = f.why_no_ondemand() if "tests/fscache" in suites else f.why_no_pagecache_share()
    if os.geteuid() != 0 or reason:
        pytest.exit(f"--host-mode refused: {reason or 'not root'}", returncode=4)
