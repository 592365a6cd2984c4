"""Model-based: random mount/umount/read sequences over a few images, domains and names,
compared after every step with the pure model of the domain rules (erofs_domains/guest/fscache/oracle.py):
mount errnos (EEXIST, EBUSY), live volumes and cookies in /proc/fs/fscache, OPEN and CLOSE
requests per blob, and the files read.

Names are drawn the way bugs hide (`name_pool`): one pool serves as fsids, domain ids and the
base layer's blob name (`device=`), so a name is often equal across kinds; names are prefixes of
one another (`p`, `p0`, a 36-byte name and its 37-byte extension, a 248-byte name and its
249-byte extension), and sit at the limits: the 36-byte /sys/fs/erofs name (truncation
collisions where rule sysfs_name_truncated holds), a 248-byte fsid/domain (the longest volume
directory) and 249 (one byte over). Never 253..255-byte fsids in a domain (key.c:47 BUG, probed
by tests/host). Sequences run into every collision of the conflict matrix: the same fsid twice
in a domain or without one, an fsid equal to a live domain or to a live blob name, the same fsid
in two domains, a blob named like another member's fsid (shares its primary cookie; not drawn
where rule bug_shared_primary_inode holds, 6.1.y's use-after-free).  The layered images share
the base layer, so members of a domain share blob cookies.

Hypothesis: deadline=None (a VM under TCG), derandomized when $CI is set, examples kept in
$EROFS_TEST_RESULTS/hypothesis otherwise; no shrinking (each example mounts for real and the
test has a time limit): a failure shows the sequence that failed, steps and tables.
"""


from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from erofs_domains.guest.fscache.rig import kernel_oracle
from fixtures.plugin import model_derandomized

MAX_EXAMPLES = 20
STEPS = 5
LAYER = 3  # index of the name that is the base layer's: mountable as fsid, and its blob name


def name_pool(p: str) -> list[str]:
    """Six names from a fresh prefix `p`: prefixes of one another and at the length limits."""
    n36 = (p + "0").ljust(36, "z")
    return [p, p + "0", n36, n36 + "z", p.ljust(248, "m"), p.ljust(249, "m")]


def samples(img) -> list[str]:
    """Files to read through a mount of `img` (a layered image, or the base layer alone)."""
    if len(img.layers) > 1:
        return ["/etc/os-release", f"/shared/from-{img.layers[1]}.bin", "/base/small/s008-4096.dat"]
    return ["/base/small/s008-4096.dat"]


def test_domain_rules_match_the_model(rig, tiny_images, hypothesis_db, features):
    layered = [tiny_images.layered("base", f"app{i}") for i in (1, 2, 3)]
    layer = tiny_images.layer("base")
    names = name_pool(rig.name("h"))
    # name i mounts as fsid this image (the daemon serves one file per name, whatever its role)
    images = [layered[0], layered[1], layered[2], layer, layered[0], layered[1]]
    for name, img in zip(names, images):
        rig.serve(rig.member(img, fsid=name))
    base_path = layered[0].device_paths[0]
    assert base_path == layer.path, "the layered images' base blob must be the base layer image"
    shared_primary_bug = features.holds("bug_shared_primary_inode")

    class DomainMachine(RuleBasedStateMachine):
        """One example: a fresh Oracle; the names are the test's (each example ends with
        nothing mounted and every volume gone, so the next starts from the same state, only
        with warm cache files, which the model does not look at)."""

        def __init__(self):
            super().__init__()
            self.names = names
            rig.oracle = kernel_oracle()
            rig.outcomes = []
            self.since = rig.daemon.position()
            self.live = {}  # oracle mount id -> Outcome

        @rule(fsid=st.integers(0, len(names) - 1), domain=st.one_of(st.none(), st.integers(0, len(names) - 1)),
              base_named=st.booleans())
        def mount(self, fsid, domain, base_named):
            img = images[fsid]
            dom = None if domain is None else self.names[domain]
            devices = ()
            if base_named and fsid != LAYER:  # device=<the layer's name> for the base blob
                devices = (self.names[LAYER], img.device_cookies[1])
                if shared_primary_bug and dom is not None and self.layer_primary_in(dom):
                    devices = ()  # 6.1.y: sharing a live primary cookie frees its inode early
            m = rig.member(img, dom, fsid=self.names[fsid], devices=devices)
            out = rig.mount(m, check=False)
            if out.mount is not None:
                self.live[out.mid] = out  # before the check: teardown unmounts it even if it fails
            rig.check_errno(out, "model: the mount's errno is the oracle's")

        def layer_primary_in(self, dom: str) -> bool:
            return any(o.member.fsid == self.names[LAYER] and o.member.domain == dom for o in self.live.values())

        @precondition(lambda self: self.live)
        @rule(data=st.data())
        def umount(self, data):
            mid = data.draw(st.sampled_from(sorted(self.live)), label="umount")
            rig.umount(self.live.pop(mid).mount)

        @precondition(lambda self: self.live)
        @rule(data=st.data())
        def read(self, data):
            mid = data.draw(st.sampled_from(sorted(self.live)), label="read")
            out = self.live[mid]
            img = out.member.image
            rig.expect_content("model: a live mount reads its files", img, out.mount, samples(img))

        @invariant()
        def fscache_matches_the_model(self):
            rig.expect_state("model: live volumes and cookies are the oracle's")
            # counts are cumulative: a late surplus request fails the next step's check
            rig.expect_requests("model: OPEN/CLOSE per blob are the oracle's", since=self.since, settle=False)

        def teardown(self):
            for out in list(self.live.values()):
                rig.umount(out.mount)
            self.live.clear()
            rig.expect_state("model: nothing left after unmounting everything")
            rig.expect_requests("model: a CLOSE for every OPEN", since=self.since)

    run_state_machine_as_test(DomainMachine, settings=settings(
        max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=model_derandomized(),
        database=hypothesis_db, phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False))
