"""tests/pagecache: erofs page-cache sharing (`-o inode_share,domain_id=D`, Linux 7.0+), as root
in a VM. Images live on an ext4 filesystem on a loop device (the guest's root is 9p, and a
backing file on 9p, tmpfs or overlay has no read_folio: the mount fails with ENOTBLK)."""

from pathlib import Path

import pytest

from erofs_domains.base.scratch import work_root


@pytest.fixture(autouse=True)
def _kernel_checks(kernel_checks):
    """Requested first, so it is torn down last: no mount or loop device left, no oops/warning."""
    yield kernel_checks


@pytest.fixture(autouse=True)
def _needs_page_cache_share(require, request):
    """Declared skip on kernels before 7.0; without the option a skip naming it (a failure under
    --strict), except for tests marked `pagecache_options`: they check what mount(2) does with
    the options on any 7.0+ kernel, the option built in or not."""
    if request.node.get_closest_marker("pagecache_options"):
        require.pagecache_options()
    else:
        require.pagecache_share()


class ImageStore:
    """Images of image_set.recipes(), built on first use on this VM's ext4 store."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict = {}

    def __getitem__(self, name: str):
        from erofs_domains.guest.pagecache import image_set, images

        if name not in self.built:
            self.built[name] = images.build(self.root / f"{name}.erofs", **image_set.recipes()[name])
        return self.built[name]


@pytest.fixture(scope="session")
def pc_store(require):
    """One ext4 filesystem per VM holding the images (built in the guest, once)."""
    require.pagecache_options()
    from erofs_domains.base.names import unique
    from erofs_domains.guest.fscache.cache import CacheFs

    fs = CacheFs.create(unique("pcstore"), 256)
    yield fs
    fs.destroy()


@pytest.fixture(scope="session")
def pc_images(pc_store):
    return ImageStore(pc_store.mountpoint)


@pytest.fixture
def domain():
    """`domain("d1")` -> a domain id unique to this test that keeps prefix relations between names
    (another test's shared inodes can linger in the page cache: never reuse a domain id)."""
    from erofs_domains.base.names import unique

    tag = unique("t")
    return lambda name="d": f"{tag}-{name}"


@pytest.fixture
def pc_mounts(kmsg):
    from erofs_domains.base.names import unique
    from erofs_domains.guest.pagecache.mounts import PcMountTable

    table = PcMountTable(root=work_root() / "pcmnt" / unique("t"), kmsg=kmsg)
    yield table
    errors = table.close()
    if errors:
        pytest.fail("unmount failed at teardown:\n" + "\n".join(errors), pytrace=False)
    try:
        table.root.rmdir()
    except OSError:
        pass


@pytest.fixture
def sharing(pc_mounts, kmsg):
    """A scenario: mounts, reads and drops done on the kernel and in the oracle; `check()`."""
    from erofs_domains.guest.pagecache.harness import Sharing

    s = Sharing(pc_mounts, kmsg)
    yield s
    s.release_all()
    errors = pc_mounts.close()
    s.by_name.clear()
    if errors:
        pytest.fail("unmount failed at teardown:\n" + "\n".join(errors), pytrace=False)
    left = s.leftovers()
    if left:
        pytest.fail(left, pytrace=False)


@pytest.fixture
def io_trace(require):
    from erofs_domains.guest.pagecache.probe import IoTrace

    require.erofs_trace()
    t = IoTrace()
    yield t
    t.close()
