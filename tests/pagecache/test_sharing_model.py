"""Model-based: random mount/umount/remount/read/DONTNEED/drop_caches sequences over plain, twin,
compressed and other images, loop-device and file-backed mounts, domains d and d1 (one a
prefix of the other) and mounts without sharing, compared after every step with the oracle
(erofs_domains/guest/pagecache/oracle.py): the file operations each file got and the pages resident in
each mount, and every read's data.

Each example gets fresh domain ids and ends with everything unmounted. Hypothesis:
deadline=None (a VM under TCG), derandomized when $CI is set, no shrinking; a failure shows
the operations, tables and rule."""


import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from erofs_domains.guest.pagecache.harness import Sharing

MAX_EXAMPLES = 12
STEPS = 8
IMAGES = ("base", "twin", "other", "base-z")


@pytest.mark.watchdog(600)
@pytest.mark.timeout(660)
def test_sharing_matches_the_model(pc_mounts, pc_images, kmsg, domain):
    imgs = {name: pc_images[name] for name in IMAGES}
    kmsg.expect(r"ignoring reconfiguration for domain_id")
    examples = iter(range(1 << 20))

    class SharingMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            n = next(examples)
            self.domains = (domain(f"e{n}d"), domain(f"e{n}d1"))
            self.s = Sharing(pc_mounts, kmsg)

        @precondition(lambda self: len(self.s.by_name) < 4)
        @rule(image=st.sampled_from(IMAGES), backing=st.sampled_from(("bdev", "file")),
              dom=st.sampled_from((0, 1, None)))
        def mount(self, image, backing, dom):
            if dom is None:
                self.s.mount(imgs[image], backing=backing, inode_share=False)
            else:
                self.s.mount(imgs[image], backing=backing, domain_id=self.domains[dom])

        @precondition(lambda self: self.s.by_name)
        @rule(data=st.data())
        def umount(self, data):
            name = data.draw(st.sampled_from(sorted(self.s.by_name)), label="umount")
            self.s.umount(self.s.by_name[name])

        def _pick(self, data):
            name = data.draw(st.sampled_from(sorted(self.s.by_name)), label="mount")
            files = sorted(self.s.images[name].files)
            return self.s.by_name[name], data.draw(st.sampled_from(files), label="file")

        @precondition(lambda self: self.s.by_name)
        @rule(data=st.data())
        def read(self, data):
            self.s.read(*self._pick(data))

        @precondition(lambda self: self.s.by_name)
        @rule(data=st.data())
        def dontneed(self, data):
            self.s.dontneed(*self._pick(data))

        @precondition(lambda self: self.s.by_name)
        @rule(data=st.data(), move=st.booleans())
        def remount(self, data, move):
            """With its own options, or a member into the other domain: erofs_fc_reconfigure()
            keeps the domain (and logs that it ignores domain_id), so the model does not change."""
            name = data.draw(st.sampled_from(sorted(self.s.by_name)), label="remount")
            m = self.s.by_name[name]
            if move and m.domain_id is not None:
                other = self.domains[1 - self.domains.index(m.domain_id)]
                self.s.remount(m, f"inode_share,domain_id={other}")
            else:
                self.s.remount(m, m.options)

        @rule(what=st.sampled_from((1, 3)))
        def drop_caches(self, what):
            self.s.drop_caches(what)

        @invariant()
        def kernel_matches_the_model(self):
            self.s.check(f"step {len(self.s.steps)}")

        def teardown(self):
            for m in list(self.s.by_name.values()):
                self.s.umount(m)

    from fixtures.plugin import model_database, model_derandomized

    run_state_machine_as_test(SharingMachine, settings=settings(
        max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=model_derandomized(),
        database=model_database("hypothesis-pagecache"),
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False))
