"""Every test here runs as root on a kernel with the on-demand features (in a VM).

Fixtures of every test family: the module's shared daemon (`shared_daemon`) and a test's view
of it (`rig` for the domain tests, `fault_env` for the fault tests; `kernel_trace`, the kernel's trace
of the requests beside a rig); daemons a test starts itself
(`daemons`, `plain_mounts`). The pieces are in fixtures/daemons.py.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from erofs_domains.base.scratch import work_root


@pytest.fixture(autouse=True)
def _fscache_backend(require):
    """First: on a kernel without erofs' fscache backend (7.2 removed it) every test here is a
    skip the rule table declares (rule fscache_backend); under --strict a kernel in range that
    lacks the options fails."""
    require.ondemand()


@pytest.fixture(autouse=True)
def _kernel_checks(_fscache_backend, kernel_checks):
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


# ----------------------------------------------------------------- the module's daemon
@pytest.fixture(scope="module")
def shared_daemon(request, require):
    """One cache and one on-demand daemon for the whole module (erofs_domains/guest/fscache/daemons.py), behind
    `rig` and `fault_env`. Module attributes: SHARED_DAEMON_ARGS (default: --fill-granularity 4096,
    so the daemon writes exactly what a READ asks for and the READs of a blob show which ranges
    the kernel fetched) and SHARED_CACHE_MIB (default 256)."""
    from erofs_domains.guest.fscache.daemons import SharedDaemon, work_dir
    from fixtures.plugin import test_dir

    require.ondemand()
    stem = Path(str(request.module.__file__)).stem
    sd = SharedDaemon(stem, list(getattr(request.module, "SHARED_DAEMON_ARGS", ["--fill-granularity", "4096"])),
                      int(getattr(request.module, "SHARED_CACHE_MIB", 256)), work_dir(f"{stem}-daemon-"),
                      test_dir(f"{stem}::shared-daemon"))
    try:
        sd.start()
        yield sd
    finally:
        sd.close()


@contextlib.contextmanager
def _test_of_shared_daemon(shared_daemon, kmsg, artifacts, prefix: str):
    """The module's daemon as this test sees it (its requests only) and the test's mounts.
    Teardown: unmount, then `end_test`; whatever went wrong fails this test."""
    from erofs_domains.base.names import unique
    from erofs_domains.guest.fscache.daemons import end_test
    from erofs_domains.guest.mounts import MountTable
    from fixtures.plugin import WATCHDOG

    window = shared_daemon.window()
    WATCHDOG.register(window.kill)
    table = MountTable(root=work_root() / "mnt" / unique(prefix), kmsg=kmsg)
    yield window, table
    errors = [f"unmount failed at teardown: {e}" for e in table.close()]
    errors += end_test(window, artifacts / "daemon-requests.jsonl")
    if errors:
        pytest.fail("teardown of the shared daemon's test:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def rig(require, shared_daemon, kmsg, artifacts):
    """A domain test's view of the module's daemon, its mounts (unmounted at teardown), an
    Oracle, and unique names (erofs_domains/guest/fscache/rig.py)."""
    from erofs_domains.base.names import unique
    from erofs_domains.guest.fscache.rig import Rig

    require.domain()
    require.stats()
    with _test_of_shared_daemon(shared_daemon, kmsg, artifacts, "t") as (window, table):
        r = Rig(window, table, kmsg, artifacts, unique)
        r.before = r.snapshot()
        yield r


@pytest.fixture
def kernel_trace(require, rig):
    """The kernel's own trace of the on-demand requests beside `rig` (cachefiles_ondemand_*
    tracepoints; erofs_domains/guest/fscache/trace_checks.py `KernelTrace`). Enabled after the rig is set up,
    so it holds every request the test's mounts make; disabled before the rig unmounts (its
    teardown's CLOSEs are not traced)."""
    from erofs_domains.guest.fscache.trace_checks import KernelTrace
    from erofs_domains.guest.observe.ondemand_trace import OndemandTrace

    require.ondemand_trace()
    trace = OndemandTrace()
    yield KernelTrace(trace, rig)
    trace.close()


@dataclass
class FaultEnv:
    """What a fault test of the module's daemon gets: its window (control channel, this test's
    requests), mounts, the kernel log and the artifacts directory."""

    window: object  # erofs_domains.guest.fscache.daemons.DaemonWindow
    mounts: object  # erofs_domains.guest.mounts.MountTable
    kmsg: object
    artifacts: Path

    @property
    def control(self):
        return self.window.control

    @property
    def cache_dir(self) -> Path:
        return self.window.cache_dir

    def requests(self, op: str | None = None) -> list[dict]:
        return self.window.requests(op=op)

    def render(self, last: int = 40) -> str:
        return self.window.render(last)

    def serve(self, image, fsid: str | None = None, devices: dict[str, str] | None = None) -> str:
        """Serve `image` under `fsid` (default: a unique name); returns the fsid."""
        return self.window.serve_image(image, fsid, devices)

    def serve_file(self, name: str, path: Path) -> str:
        return self.window.serve_blob(name, path)


@pytest.fixture
def fault_env(shared_daemon, kmsg, artifacts):
    with _test_of_shared_daemon(shared_daemon, kmsg, artifacts, "f") as (window, table):
        yield FaultEnv(window, table, kmsg, artifacts)


# ----------------------------------------------------------------- daemons of one test
@pytest.fixture
def daemons(cache_fs, artifacts):
    """Daemons the test starts (and kills) itself, on its own cache (erofs_domains/guest/fscache/daemons.py)."""
    from erofs_domains.guest.fscache.daemons import Daemons, work_dir
    from fixtures.plugin import WATCHDOG

    d = Daemons(Path(cache_fs.mountpoint), artifacts, work_dir("d-"), WATCHDOG)
    yield d
    d.close()


@pytest.fixture
def plain_mounts(daemons, kmsg):
    """A MountTable torn down before `daemons` (so mounts go before their daemons)."""
    from erofs_domains.base.names import unique
    from erofs_domains.guest.mounts import MountTable

    table = MountTable(root=work_root() / "mnt" / unique("p"), kmsg=kmsg)
    yield table
    errors = table.close()
    if errors:
        pytest.fail("unmount failed at teardown:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def hypothesis_db():
    """Hypothesis' example database, kept with the results (<results>/hypothesis)."""
    from fixtures.plugin import model_database

    return model_database("hypothesis")
