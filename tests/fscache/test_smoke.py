"""One image, one mount, through the daemon: the path every other test stands on."""

import re

from tabulate import tabulate

from erofs_domains.guest.observe import procfs
from erofs_domains.guest.observe.cachedir import CacheDirListing, predict_path


def test_single_image_fsid_mount(require, images, daemon, mounts, snapshot):
    """mount -o fsid=F: every file matches the manifest; volume `erofs,F` with one cookie F;
    the daemon saw OPEN(erofs,F / F); after umount the cache file sits at the predicted path."""
    require.ondemand()
    img = images.single("smoke")
    daemon.serve(img)
    before = snapshot()
    m = mounts.mount_erofs(img.fsid, devices=img.devices)

    mismatches = img.verify(m.path)
    assert not mismatches, "content differs from the manifest:\n" + "\n".join(map(str, mismatches[:20]))

    during = snapshot().erofs()
    vol = f"erofs,{img.fsid}"
    assert [v.key for v in during.volumes] == [vol], during.render()
    assert sorted(c.key_text for c in during.cookies_of(vol)) == [img.fsid], during.render()

    daemon.control.wait_idle(timeout=10)   # requests are logged after their answer (docs/protocol.md#waiting)
    opens = [r for r in daemon.requests() if r["op"] == "OPEN"]
    assert [(r["volume_key"], r["cookie_key"]) for r in opens] == [(vol, img.fsid)], daemon.render()

    mounts.umount(m)
    daemon.control.wait_idle(timeout=10)
    expected = predict_path(vol, img.fsid.encode())
    listing = CacheDirListing.scan(daemon.cache_dir)
    assert expected in listing.paths(), (
        f"cache file {expected} missing after umount\n{listing.render()}\n"
        + before.diff(snapshot()).render()
    )
    f = listing.file(expected)
    assert f.xattr is not None and f.xattr.object_size == img.blobs[img.fsid].size, tabulate(
        [(f.path, f.size, f.allocated, f.xattr)], headers=["file", "size", "allocated", "xattr"])


def test_log_lines_and_proc_formats_follow_the_rules(require, images, daemon, mounts, kmsg, features):
    """What this kernel prints is what its rules say: the cache's `added` line and its prefix
    (rule fscache_core_log), the mount's fscache-mode banner (rule ondemand_deprecated), the
    /proc/fs/fscache layout and the stats header (rule netfs_procfs)."""
    require.ondemand()
    img = images.single("smoke")
    daemon.serve(img)
    m = mounts.mount_erofs(img.fsid, devices=img.devices)
    prefix = features.pick("fscache_core_log", "FS-Cache", "netfs")
    banner = features.pick("ondemand_deprecated", r"\[deprecated\] fscache-based on-demand read feature in use",
                           r"EXPERIMENTAL fscache-based on-demand read feature in use")
    layout = features.pick("netfs_procfs", "6.12", "6.1")
    with open("/proc/fs/fscache/stats") as f:
        stats = f.read()
    checks = [
        ("fscache_core_log", f'{prefix}: Cache "{daemon.tag}" added',
         bool(kmsg.grep(rf'{prefix}: Cache "{re.escape(daemon.tag)}" added'))),
        ("ondemand_deprecated", banner.replace("\\", ""), bool(kmsg.grep(rf"erofs: \(device [^)]*\): {banner}"))),
        ("netfs_procfs", f"/proc/fs/fscache layout {layout}", procfs.proc_layout() == layout),
        ("netfs_procfs", f"stats header of {layout}", procfs.stats_format(stats) == layout),
        ("netfs_procfs", "IO line with mis=" if layout == "6.12" else "IO line without mis=",
         any(line.startswith("IO") and ("mis=" in line) == (layout == "6.12") for line in stats.splitlines())),
    ]
    mounts.umount(m)
    bad = [(rule, want) for rule, want, ok in checks if not ok]
    assert not bad, (f"kernel {features.release} does not print what its rules say:\n"
                     + tabulate(bad, headers=["rule", "expected"]) + "\n\nkernel log of the test:\n"
                     + "\n".join(str(x) for x in kmsg.lines()[-30:]) + "\n\nstats:\n" + stats)
