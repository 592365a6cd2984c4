"""The suite's own safety nets, proven on the real kernel: a check that cannot fail is no check."""

import errno
import threading

import pytest

from erofs_domains.base import config
from erofs_domains.guest import kmsg as kmsg_mod
from erofs_domains.guest import leaks
from erofs_domains.guest.fscache.cache import cachefiles_free
from erofs_domains.guest.mounts import MountError, sys_mount, sys_umount
from erofs_domains.guest.observe import procfs
from fixtures.plugin import WATCHDOG


def test_kmsg_checker_reports_a_warning(kmsg):
    """A WARNING: line written during the test is reported, unless the test declares it."""
    kmsg_mod.write("WARNING: erofs-fscache-tests self-check, not a kernel problem")
    found = kmsg.problems()
    assert [(kind, "self-check" in line.text) for kind, line in found] == [("WARNING", True)], found
    kmsg.expect(r"erofs-fscache-tests self-check")
    assert kmsg.problems() == []


def test_leak_check_reports_a_leaked_mount(require, images, daemon, tmp_path):
    """A mount made behind the fixtures' back is reported with its volume and cookie."""
    img = images.single("smoke")
    daemon.serve(img)
    before = leaks.SystemState.capture()
    target = tmp_path / "leak"
    target.mkdir()
    sys_mount("none", target, "erofs", 1, f"fsid={img.fsid}")
    try:
        leaked = leaks.wait_for_no_leaks(before, timeout=0.5)
        assert str(target) in leaked.get("erofs_mounts", set()), leaks.render(leaked)
        assert f"erofs,{img.fsid}" in leaked.get("volumes", set()), leaks.render(leaked)
        assert any(img.fsid in c for c in leaked.get("cookies", set())), leaks.render(leaked)
    finally:
        sys_umount(target)
    assert leaks.wait_for_no_leaks(before) == {}


def test_daemon_stop_withdraws_the_cache(daemon):
    """Stopping the daemon unbinds the cache (state '-') and frees /dev/cachefiles."""
    assert not cachefiles_free(), "/dev/cachefiles opened twice while the daemon holds it"
    assert [c.state for c in procfs.read_caches() if c.name == daemon.tag] == ["A"], procfs.read_caches()
    daemon.stop()
    from erofs_domains.guest.fscache.cache import wait_withdrawn

    wait_withdrawn(daemon.tag, timeout=10)
    # A withdrawn cache shows state '-' while something still refers to it, then goes away.
    assert [c.state for c in procfs.read_caches() if c.name == daemon.tag] in ([], ["-"])


def test_mount_error_carries_errno_and_kernel_log(daemon, mounts):
    """A mount whose blob the daemon does not know fails with the errno and the log lines."""
    with pytest.raises(MountError) as e:
        mounts.mount_erofs("no-such-blob")
    assert e.value.errno in (errno.ENOBUFS, errno.EIO), e.value
    assert any("erofs" in line for line in e.value.log), e.value


@pytest.mark.watchdog(30)
def test_watchdog_kills_the_daemon_of_a_hung_test(images, daemon, mounts):
    """A reader blocked on a READ the daemon never answers is freed by the watchdog: it
    kills the daemon, the kernel fails the pending request (EIO), the test goes on."""
    img = images.single("smoke")
    daemon.serve(img)
    m = mounts.mount_erofs(img.fsid)
    daemon.control.fail_read("ignore")
    big = max(img.manifest.files(), key=lambda p: img.manifest[p].size)
    result = {}

    def reader():
        try:
            (m.path / big.lstrip("/")).read_bytes()
            result["ok"] = True
        except OSError as e:
            result["errno"] = e.errno

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(90)
    assert not t.is_alive(), "reader still blocked 90 s, after the watchdog should have fired"
    assert WATCHDOG.fired, "the watchdog did not fire"
    assert result.get("errno") in (errno.EIO, errno.ENOBUFS, errno.EINTR), result
    assert daemon.proc.wait(10) == -9, "the daemon was not killed by the watchdog"


def test_the_host_knows_which_test_runs_and_its_bound(request):
    """The VM wrapper ends a guest whose test outlives its bound (erofs_domains/host/guard.py), a
    task in D state being beyond pytest-timeout's reach; it reads the test and the bound
    from the state file the guest writes."""
    import json

    path = config.current().vm_state
    if not path:
        pytest.skip("not in a VM started by tools/vm-python")
    state = json.loads(path.read_text())
    assert state["test"] == request.node.nodeid, state
    assert state["bound"] > request.config.getoption("test_timeout"), state


def test_the_guest_finds_the_images_the_host_prebuilt(images):
    """The controller builds the images of its seed (EROFS_TEST_SEED) before the VMs start;
    a guest that did not get the seed would build another seed's images itself."""
    if not config.current().in_vm:
        pytest.skip("host mode: no controller prebuilds images")
    assert str(config.current().seed) == str(images.seed), "the controller's seed did not reach the guest"
    img = images.single("smoke")
    assert img.cached, f"the guest built the smoke image of seed {images.seed} itself: the host prebuilt another seed"
