"""One image, one mount, through the daemon: the path every other test stands on."""

from tabulate import tabulate

from fixtures.observe.cachedir import CacheDirListing, predict_path


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
