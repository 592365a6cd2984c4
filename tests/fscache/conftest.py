"""Every test here runs as root on a kernel with the on-demand features (in a VM)."""

import os
from pathlib import Path

import pytest

from fixtures.paths import work_root


@pytest.fixture(autouse=True)
def _kernel_checks(kernel_checks):
    """Requested first, so it is torn down last: after mounts, daemon and cache are gone,
    nothing may be left behind and the kernel log must hold no oops or warning."""
    yield kernel_checks


@pytest.fixture(autouse=True)
def _fresh_daemon_log(artifacts):
    """The daemon appends to results/tests/<test>/daemon-requests.jsonl: start each run of a
    test with an empty one, or requests of earlier runs count as this run's."""
    for name in ("daemon-requests.jsonl", "daemon-stderr.log"):
        (artifacts / name).unlink(missing_ok=True)


# ----------------------------------------------------------------- shared-domain tests
@pytest.fixture(scope="session")
def tiny_images(images):
    """Like `images`, with the "tiny" profile (about 1.5 MB per layer): for tests that mount
    many images and read them several times."""
    import copy

    tiny = copy.copy(images)  # the same cache, seed and mkfs.erofs, without asking it its version again
    tiny.profile, tiny.builds, tiny.hits = "tiny", 0, 0
    return tiny


class ModuleRig:
    """One cache filesystem and one on-demand daemon for a whole test module (see
    tests/fscache/checks.py); restarted if a test's watchdog killed the daemon."""

    def __init__(self, workdir: Path):
        from fixtures.cache import CacheFs
        from fixtures.plugin import unique

        self.workdir = workdir
        self.cache_fs = CacheFs.create(unique("dcache"), 256)
        self.daemon = None
        try:
            self.start()
        except Exception:
            self.cache_fs.destroy()
            raise

    def start(self) -> None:
        from fixtures.ondemand.process import DaemonProcess
        from fixtures.plugin import unique

        # --fill-granularity 4096: the daemon writes exactly what a READ asks for, so the READs
        # of a blob show which ranges the kernel fetched, and how often.
        self.daemon = DaemonProcess(cache_dir=self.cache_fs.mountpoint, workdir=self.workdir, tag=unique("d"),
                                    extra_args=["--fill-granularity", "4096"])
        self.served = {}  # what the daemon serves: cookie name -> path (see DaemonWindow.serve_blob)
        self.daemon.start()

    def ensure(self) -> None:
        from fixtures.cache import wait_withdrawn

        if self.daemon.alive:
            return
        self.daemon.stop()
        wait_withdrawn(self.daemon.tag)
        self.start()

    def close(self) -> None:
        from fixtures.cache import wait_withdrawn

        try:
            if self.daemon is not None:
                self.daemon.stop()
                wait_withdrawn(self.daemon.tag)
        finally:
            self.cache_fs.destroy()


@pytest.fixture(scope="module")
def domain_rig(require, request):
    """The module's cache and daemon.  Its logs live in the guest's /tmp (a request log on
    the 9p results directory slows every request down) and are copied to
    results/tests/<module>-daemon/ at the end; each test saves its own slice as well."""
    import shutil

    from fixtures.plugin import RESULTS, unique

    require.domain()
    require.stats()
    stem = Path(request.node.nodeid).stem + "-daemon"
    workdir = work_root() / unique(stem)
    workdir.mkdir(parents=True, exist_ok=True)
    rig = ModuleRig(workdir)
    yield rig
    try:
        rig.close()
    finally:
        dest = RESULTS / "tests" / stem
        dest.mkdir(parents=True, exist_ok=True)
        for f in workdir.iterdir():
            shutil.copyfile(f, dest / f.name)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def rig(domain_rig, kmsg, artifacts):
    """This test's view of the module's daemon, its mounts (unmounted at teardown), an Oracle,
    and unique names; its slice of the daemon log goes to its artifacts directory."""
    from fixtures.mounts import MountTable
    from fixtures.plugin import WATCHDOG, unique
    from tests.fscache.checks import DaemonWindow, Rig

    domain_rig.ensure()
    WATCHDOG.register(domain_rig.daemon.kill)
    table = MountTable(root=work_root() / "mnt" / unique("t"), kmsg=kmsg)
    r = Rig(DaemonWindow(domain_rig.daemon, served=domain_rig.served), table, kmsg, artifacts, unique)
    r.before = r.snapshot()
    yield r
    errors = table.close()
    try:
        if domain_rig.daemon.alive:
            r.daemon.wait_idle(timeout=10)
    finally:
        r.daemon.save(artifacts / "daemon-requests.jsonl")
    if errors:
        pytest.fail("unmount failed at teardown:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def hypothesis_db():
    """Hypothesis' example database, kept with the results ($EROFS_TEST_RESULTS/hypothesis)."""
    from hypothesis.database import DirectoryBasedExampleDatabase

    from fixtures.plugin import RESULTS

    path = Path(os.environ.get("EROFS_TEST_RESULTS") or RESULTS) / "hypothesis"
    path.mkdir(parents=True, exist_ok=True)
    return DirectoryBasedExampleDatabase(str(path))
