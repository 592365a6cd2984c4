"""What the kernel itself says it asked the daemon: the cachefiles_ondemand_* tracepoints, a
channel independent of the daemon's request log (docs/observables.md#the-kernels-trace).

The trace and the log must hold the same OPENs, READs and CLOSEs; and the kernel's own trace
shows cookie reuse in a shared domain: a blob already open in the domain is not opened again
and its data is read once, while another domain, or a mount without one, opens and reads its
own copy."""

from collections import Counter

from tabulate import tabulate

from erofs_domains.guest.fscache.rig import layer_sample

RULE_OPEN = ("a blob already open in a domain is not opened again by a new member (no "
             "cachefiles_ondemand_open); another domain or a mount without one opens its own")
RULE_READ = ("data a member of a domain read is not read again through another member (no "
             "cachefiles_ondemand_read); another domain or a mount without one reads its own copy")


def steps(rig, tiny_images):
    """Mounts of the base+app<i> images as (image, app layer, domain, fsid): two members of
    domain d1, one of d2, one without a domain. Every fsid is new, so that only the blobs'
    cookies can be shared (a primary cookie is unique in its domain, EROFS_REG_COOKIE_NEED_NOEXIST)."""
    img1, img2 = (tiny_images.layered("base", f"app{i}") for i in (1, 2))
    d1, d2 = rig.name("d"), rig.name("d")
    return [(img1, "app1", d1, rig.name("f")), (img2, "app2", d1, rig.name("f")), (img2, "app2", d2, rig.name("f")),
            (img2, "app2", None, rig.name("f"))]


def base_cookie(tiny_images) -> str:
    """The base layer's cookie name (its device tag) in every base+app image."""
    return tiny_images.layered("base", "app1").device_cookies[0]


def test_the_kernel_trace_and_the_daemon_log_agree(rig, tiny_images, kernel_trace):
    """Two members of a domain, one of another and a mount without a domain; files read through
    each; all unmounted. Every request the kernel traced is one the daemon logged and answered,
    on the same object (msg id, object id, anon fd), and the other way round."""
    for img, layer, dom, fsid in steps(rig, tiny_images):
        m = rig.must_mount(img, dom, fsid=fsid, rule="trace: every mount mounts")
        rig.expect_content("trace: files read back", img, m, layer_sample(img, "base") + layer_sample(img, layer))
    kernel_trace.expect_agreement("while mounted and read", ("open", "copen", "read", "cread", "fd_write"))
    rig.umount_all()
    kernel_trace.expect_agreement("after every unmount", ("close", "fd_release"))


def test_the_kernel_opens_a_shared_blob_once_per_domain(rig, tiny_images, kernel_trace):
    """Each mount's OPENs as the kernel traced them are the oracle's: the second member of d1
    opens its own blobs but not the base layer d1 already has open; d2 and the mount without a
    domain open the base again."""
    rows, bad = [], False
    for img, _, dom, fsid in steps(rig, tiny_images):
        mark = kernel_trace.mark()
        out = rig.mount(img, dom, fsid=fsid, rule="trace: every mount mounts")
        want = Counter(out.predicted.opened)
        kernel_trace.settle(lambda mark=mark, want=want: kernel_trace.opened(mark) == want)
        got = kernel_trace.opened(mark)
        rows += [(out.member.describe(), f"{v} / {c}", want[(v, c)], got[(v, c)],
                  "<-- differs" if want[(v, c)] != got[(v, c)] else "")
                 for v, c in sorted(set(want) | set(got), key=str)]
        bad |= got != want
    if bad:
        kernel_trace.fail(f"trace: {RULE_OPEN}", "OPENs per mount, the oracle's against the kernel's trace:\n"
                          + tabulate(rows, headers=("mount", "volume / cookie", "oracle", "kernel traced", "")))


def test_the_kernel_reads_shared_data_once_per_domain(rig, tiny_images, kernel_trace):
    """The same base files read through every mount: the kernel traces READs of the base blob
    for the first member of d1, none for the second, and READs of another object for d2 and for
    the mount without a domain; no range of one object is traced twice."""
    rows, bad, seen = [], [], set()
    cookie = base_cookie(tiny_images)
    for k, (img, _, dom, fsid) in enumerate(steps(rig, tiny_images)):
        m = rig.must_mount(img, dom, fsid=fsid, rule="trace: every mount mounts")
        mark = kernel_trace.mark()
        rig.expect_content("trace: base files read back", img, m, layer_sample(img, "base"))
        volume = rig.outcomes[-1].member.volume
        first_in_volume = volume not in seen
        seen.add(volume)

        def base_reads(mark=mark, volume=volume):
            return [e for name, e in kernel_trace.since(mark, "read") if name == (volume, cookie)]

        kernel_trace.settle(lambda first=first_in_volume: bool(base_reads()) == first)
        base = base_reads()
        rows.append((k + 1, rig.outcomes[-1].member.describe(), len(base),
                     " ".join(sorted({f"{e.obj:x}" for e in base})), "some" if first_in_volume else "none"))
        if bool(base) != first_in_volume:
            bad.append(k + 1)
    again = Counter((e.obj, e.start, e.length) for _, e in kernel_trace.since(0, "read"))
    twice = [(f"{o:x}", s, n, c) for (o, s, n), c in again.items() if c > 1]
    if bad or twice:
        kernel_trace.fail(f"trace: {RULE_READ}",
                          f"READs of the base blob per mount (wrong at mount {bad or '-'}):\n"
                          + tabulate(rows, headers=("mount", "member", "kernel READs of base", "objects", "expected"))
                          + ("\n\nranges traced more than once:\n" + tabulate(twice, headers=("o", "s", "l", "times"))
                             if twice else ""))
