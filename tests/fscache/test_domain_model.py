"""Model-based: random mount/umount/read sequences over a few images, domains and names,
compared after every step with the pure model of the domain rules (fixtures/oracle.py):
mount errnos (EEXIST, EBUSY), live volumes and cookies in /proc/fs/fscache, OPEN and CLOSE
requests per blob, and the files read.

Three short names (fresh per example) serve both as fsids and as domain ids, so sequences
run into every collision of the conflict matrix: the same fsid twice in a domain or without
one, an fsid equal to a live domain, the same fsid in two domains.  Each name is mounted as
a layered image over the common base layer, so members of a domain share blob cookies.

Hypothesis: deadline=None (a VM under TCG), derandomized when $CI is set, examples kept in
$EROFS_TEST_RESULTS/hypothesis otherwise; no shrinking (each example mounts for real and the
test has a time limit): a failure shows the sequence that failed, steps and tables.
"""

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from fixtures.oracle import Oracle

MAX_EXAMPLES = 20
STEPS = 5


def test_domain_rules_match_the_model(rig, tiny_images, hypothesis_db):
    images = [tiny_images.layered("base", "app1"), tiny_images.layered("base", "app2"),
              tiny_images.layered("base", "app3")]
    p = rig.name("h")
    names = [f"{p}{c}" for c in "abc"]
    for name, img in zip(names, images):
        rig.serve(rig.member(img, fsid=name))

    class DomainMachine(RuleBasedStateMachine):
        """One example: a fresh Oracle; the names are the test's (each example ends with
        nothing mounted and every volume gone, so the next starts from the same state, only
        with warm cache files, which the model does not look at)."""

        def __init__(self):
            super().__init__()
            self.names = names
            rig.oracle = Oracle()
            rig.outcomes = []
            self.since = rig.daemon.position()
            self.live = {}  # oracle mount id -> Outcome

        @rule(fsid=st.integers(0, 2), domain=st.one_of(st.none(), st.integers(0, 2)))
        def mount(self, fsid, domain):
            m = rig.member(images[fsid], None if domain is None else self.names[domain], fsid=self.names[fsid])
            out = rig.mount(m, check=False)
            if out.mount is not None:
                self.live[out.mid] = out  # before the check: teardown unmounts it even if it fails
            rig.check_errno(out, "model: the mount's errno is the oracle's")

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
            rig.expect_content("model: a live mount reads its files", img, out.mount,
                               ["/etc/os-release", f"/shared/from-{img.layers[1]}.bin", "/base/small/s008-4096.dat"])

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

    ci = bool(os.environ.get("CI"))
    run_state_machine_as_test(DomainMachine, settings=settings(
        max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=ci,
        database=None if ci else hypothesis_db, phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False))
