"""Comparing two kernels' runs (erofs_domains/host/compare.py), the observables recorder's pure parts
(fixtures/record.py), patch series and farms (erofs_domains/host/variants.py) and the bisect search."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from erofs_domains.guest import observables
from erofs_domains.host import bisection, compare, variants
from fixtures import record

DATA = Path(__file__).parent / "data" / "compare"
T1 = "tests/fscache/test_domains.py::test_shared_domain_fetches_base_once[2]"
T3 = "tests/fscache/test_domain_lifecycle.py::test_member_leaves"
T5 = "tests/fscache/test_domain_conflicts.py::test_same_fsid_twice"


def recorded(kind: str = "") -> compare.Comparison:
    runs_a = compare.load_runs(DATA / "a-run.jsonl")
    runs_b = compare.load_runs(DATA / "b-run.jsonl")
    if kind == "reruns":
        runs_a += compare.load_runs(DATA / "a-rerun.jsonl")
        runs_b += compare.load_runs(DATA / "b-rerun.jsonl")
    return compare.Comparison.of("default", "default + break.patch", runs_a, runs_b, {"selection": "-k domains"})


# ----------------------------------------------------------------- comparison
def test_parse_runs_splits_repeats_into_runs():
    runs = compare.load_runs(DATA / "a-rerun.jsonl")
    assert len(runs) == 2
    assert list(runs[0]) == [T1, T3, T5] and list(runs[1]) == [T1, T3, T5]


def test_first_runs_differ_in_outcome_and_observables():
    a, b = compare.load_runs(DATA / "a-run.jsonl")[0], compare.load_runs(DATA / "b-run.jsonl")[0]
    assert compare.differing(a, b) == [T1, T3, T5]


def test_groups_after_reruns():
    c = recorded("reruns")
    assert [t.nodeid for t in c.group("newly failing")] == [T1]
    assert [t.nodeid for t in c.group("changed observables")] == [T3]
    assert [t.nodeid for t in c.group("flaky")] == [T5]
    assert len(c.unchanged) == 2
    assert c.exit_status == 1
    t1 = c.group("newly failing")[0]
    assert t1.rule.startswith("RULE BROKEN: shared domain: one volume")
    assert ("daemon OPEN erofs,d#1/base", "1", "2") in t1.moved
    assert ("cookie erofs,d#1/base", "1", "2") in t1.moved
    assert t1.reruns == 2 and t1.gates
    t5 = c.group("flaky")[0]
    assert t5.outcome_b == "failed 1/3, passed 2/3" or t5.outcome_b == "passed 2/3, failed 1/3"
    assert not t5.gates


def test_without_reruns_a_difference_is_a_change():
    c = recorded()
    assert [t.nodeid for t in c.group("newly failing")] == [T1, T5]
    assert not c.group("flaky")


def test_identical_runs_report_no_change():
    runs = compare.load_runs(DATA / "a-run.jsonl")
    c = compare.Comparison.of("x", "x", runs, runs)
    assert all(t.group == "unchanged" for t in c.tests)
    assert c.exit_status == 0
    text = c.render()
    assert "Unchanged: 5 tests (passed 4, skipped 1)" in text
    assert "Newly failing" not in text


def test_flaky_observable_is_not_a_change():
    a = [{"t": compare.Run("passed", observables={"k": 1, "j": 2})},
         {"t": compare.Run("passed", observables={"k": 1, "j": 2})}]
    b = [{"t": compare.Run("passed", observables={"k": 2, "j": 2})},
         {"t": compare.Run("passed", observables={"k": 1, "j": 2})}]
    c = compare.Comparison.of("a", "b", a, b)
    (t,) = c.tests
    assert t.group == "flaky" and t.unsteady == [("k", "1", "2 | 1")] and not t.moved


def test_newly_passing_does_not_gate_and_only_in_one_side():
    a = [{"t": compare.Run("failed", "RULE BROKEN: x"), "gone": compare.Run("passed")}]
    b = [{"t": compare.Run("passed"), "new": compare.Run("passed")}]
    c = compare.Comparison.of("a", "b", a, b)
    assert [t.group for t in c.tests] == ["newly passing", "only in A", "only in B"]
    assert c.exit_status == 0
    assert c.tests[0].rule == "RULE BROKEN: x"


def test_skip_to_fail_is_newly_failing_but_does_not_gate():
    c = compare.Comparison.of("a", "b", [{"t": compare.Run("skipped", "no domain")}],
                              [{"t": compare.Run("error", "leak")}])
    assert c.tests[0].group == "newly failing" and c.exit_status == 0


def test_reports_render_in_three_formats():
    c = recorded("reruns")
    text = c.render("simple")
    assert "Newly failing (B fails what A does not): 1" in text
    assert "observables that moved (3 run(s) of A, 3 of B)" in text
    assert "daemon OPEN erofs,d#1/base" in text
    md = c.render("github")
    assert "### Newly failing (B fails what A does not): 1" in md
    assert "| daemon OPEN erofs,d#1/base" in md
    j = c.to_json()
    json.dumps(j)
    assert j["exit_status"] == 1
    assert j["groups"]["newly failing"][0]["moved"][0]["observable"]
    assert j["unchanged"]["count"] == 2


def test_long_moved_lists_are_cut_in_text_not_in_json():
    obs_a = {f"k{i}": i for i in range(30)}
    obs_b = {f"k{i}": i + 1 for i in range(30)}
    c = compare.Comparison.of("a", "b", [{"t": compare.Run("passed", observables=obs_a)}],
                              [{"t": compare.Run("passed", observables=obs_b)}])
    assert "... 15 more" in c.render(max_rows=15)
    assert len(c.to_json()["groups"]["changed observables"][0]["moved"]) == 30


# ----------------------------------------------------------------- recorder (pure parts)
def test_normalizer_numbers_unique_names_per_prefix_and_hides_fanout():
    n = observables.Normalizer()
    assert n("fsid=d123x45,domain_id=d123x46") == "fsid=d#1,domain_id=d#2"
    assert n("cache/Ierofs,d123x45/@3f/Dblob") == "cache/Ierofs,d#1/@../Dblob"
    assert n("t7x1 and cache8x2") == "t#1 and cache#1"
    assert n("0x1f s008-4096.dat app1") == "0x1f s008-4096.dat app1"
    assert n.kmsg("CacheFiles: cookie ffff888004a1c000 at 0x10 for d123x45") == \
        "CacheFiles: cookie <hex> at <hex> for d#1"
    assert n.kmsg("failed to get cookie for 8e90e569a9ba5886bf2b96c922ddb389") == \
        "failed to get cookie for 8e90e569a9ba5886bf2b96c922ddb389"


def test_daemon_counts_per_blob():
    reqs = [{"op": "OPEN", "volume_key": "erofs,d5x1", "cookie_key": "base"},
            {"op": "READ", "volume_key": "erofs,d5x1", "cookie_key": "base", "len": 4096},
            {"op": "READ", "volume_key": "erofs,d5x1", "cookie_key": "base", "len": 8192},
            {"op": "CLOSE", "volume_key": "erofs,d5x1", "cookie_key": "base"},
            {"op": "COPEN_REPLY"}]
    assert observables.daemon_counts(reqs, observables.Normalizer()) == {
        "daemon OPEN erofs,d#1/base": 1, "daemon READ erofs,d#1/base": "2 x, 12288 B",
        "daemon CLOSE erofs,d#1/base": 1}


def test_stats_delta_leaves_out_timers_and_gauges():
    before = {"Acquire": {"n": 3, "ok": 3}, "LRU": {"n": 1, "at": 500}, "Cookies": {"n": 2}}
    after = {"Acquire": {"n": 5, "ok": 5}, "LRU": {"n": 4, "at": 10}, "Cookies": {"n": 0}}
    assert observables.stats_delta(before, after) == {"stats Acquire.n": 2, "stats Acquire.ok": 2}
    assert observables.stats_delta(None, after) == {}


def test_failure_rule_first_line():
    crash = SimpleNamespace(longrepr=SimpleNamespace(reprcrash=SimpleNamespace(
        message="AssertionError: RULE BROKEN: shared domain: x\nmore")))
    assert record.failure_rule(crash) == "RULE BROKEN: shared domain: x"
    assert record.failure_rule(SimpleNamespace(longrepr="\nthe kernel logged 1 problem line(s)\n")) == \
        "the kernel logged 1 problem line(s)"
    assert record.failure_rule(SimpleNamespace(longrepr=("f.py", 3, "Skipped: no /dev/kmsg"))) == "no /dev/kmsg"
    assert record.failure_rule(SimpleNamespace(longrepr=None)) is None


def test_failure_detail_keeps_an_xfails_console_lines():
    xfail = SimpleNamespace(longrepr=SimpleNamespace(reprcrash=SimpleNamespace(
        message="_pytest.outcomes.XFailed: known kernel bug (rule bug_x): y\nRESULT both members mounted\n"
                "VFS: Busy inodes after unmount of erofs")))
    assert record.failure_rule(xfail) == "known kernel bug (rule bug_x): y"
    assert record.failure_detail(xfail) == ["RESULT both members mounted", "VFS: Busy inodes after unmount of erofs"]


def test_declared_skips_are_read_from_the_rule_tables_own_messages():
    from erofs_domains.guest.kernel_features import KernelFeatures
    from fixtures.requirements import Requirements

    config = {"CONFIG_EROFS_FS_ONDEMAND": "y", "CONFIG_CACHEFILES_ONDEMAND": "y"}
    reasons = []
    for release, call in (("6.1.192", lambda r: r.rule("file_backed_mount")), ("6.0.5", lambda r: r.rule("restore")),
                          ("6.1.192", lambda r: r.not_bug("bug_shared_primary_inode"))):
        with pytest.raises(pytest.skip.Exception) as e:
            call(Requirements(KernelFeatures(release, config, True), strict=True))
        reasons.append(str(e.value))
    skip = compare.declared_skip(compare.Run("skipped", reasons[0]))
    assert (skip.kind, skip.rule, skip.kernels, skip.release) == ("version rule skip", "file_backed_mount",
                                                                   ">= 6.12", "6.1.192")
    skip = compare.declared_skip(compare.Run("skipped", reasons[1]))  # a range with parentheses in it
    assert (skip.rule, skip.kernels, skip.release) == (
        "restore", "6.1.95+ (6.1.y), 6.6.35+ (6.6.y), 6.8 - 7.2", "6.0.5")
    bug = compare.declared_skip(compare.Run("skipped", reasons[2]))
    assert (bug.kind, bug.rule, bug.release) == ("known kernel bug", "bug_shared_primary_inode", "6.1.192")
    assert bug.doc == "docs/known-bugs/erofs-6.1-shared-primary-cookie.md" and bug.doc in reasons[2]
    assert compare.declared_skip(compare.Run("skipped", "kernel 6.1.192 lacks CONFIG_FS_DAX")) is None


def test_log_lines_are_explained_by_the_rule_that_words_them():
    rules = compare.rules_between("6.1.192", "6.12.117")
    assert {"ondemand_deprecated", "fscache_core_log", "file_backed_mount"} <= set(rules)
    assert "bug_shared_primary_inode" in rules and "restore" not in rules
    old, new = 'kmsg [log] FS-Cache: Cache "t#1" added', 'kmsg [log] netfs: Cache "t#1" added'
    assert compare._explains(old, "1", "-", rules, "6.1.192") == "fscache_core_log"
    assert compare._explains(new, "-", "1", rules, "6.1.192") == "fscache_core_log"
    assert compare._explains(new, "1", "-", rules, "6.1.192") is None  # worded as the other kernel would
    assert compare._explains("kmsg [log] erofs: mounted", "1", "2", rules, "6.1.192") is None
    assert compare._explains("rule death_read_enobufs", "does not hold", "holds", rules, "6.1.192") == \
        "death_read_enobufs"
    # a test that asked about a differing rule: the rule row is explained, its other moves not
    c = compare.Comparison.of("6.1", "6.12",
                              [{"t": compare.Run("passed", observables={"rule death_read_enobufs": "does not hold",
                                                                        "errno": "EIO"}),
                                "u": compare.Run("passed", observables={"rule death_read_enobufs": "does not hold",
                                                                        old: 1})}],
                              [{"t": compare.Run("passed", observables={"rule death_read_enobufs": "holds",
                                                                        "errno": "ENOBUFS"}),
                                "u": compare.Run("passed", observables={"rule death_read_enobufs": "holds",
                                                                        new: 1})}],
                              releases=("6.1.192", "6.12.117"))
    assert [t.group for t in c.tests] == ["changed observables", "changed by rules"]
    assert c.tests[0].rules == {"rule death_read_enobufs": "death_read_enobufs"}
    # only a rule it asked about differs, nothing it observed: unchanged, and not rerun
    a = {"v": compare.Run("passed", observables={"rule sysfs_name_truncated": "does not hold", "mount 1": "OK"})}
    b = {"v": compare.Run("passed", observables={"rule sysfs_name_truncated": "holds", "mount 1": "OK"})}
    assert compare.Comparison.of("6.1", "6.12", [a], [b], releases=("6.1.192", "6.12.117")).tests[0].group == \
        "unchanged"
    assert compare.differing(a, b, ("6.1.192", "6.12.117")) == [] and compare.differing(a, b) == ["v"]
    assert "errno" in c.render() and "| death_read_enobufs" in c.render("github")
    # what a rule the test asked about declares it moves (Rule.moves)
    a = {"w": compare.Run("passed", observables={"rule unaligned_write_refused": "does not hold", "stats IO.wr": 2})}
    b = {"w": compare.Run("passed", observables={"rule unaligned_write_refused": "holds", "stats IO.wr": 1,
                                                 "stats IO.mis": 1})}
    (t,) = compare.Comparison.of("6.1", "6.12", [a], [b], releases=("6.1.192", "6.12.117")).tests
    assert t.group == "changed by rules" and set(t.rules.values()) == {"unaligned_write_refused"}
    for side in (a, b):  # not asked about: not explained
        side["w"].observables.pop("rule unaligned_write_refused")
    assert compare.Comparison.of("6.1", "6.12", [a], [b], releases=("6.1.192", "6.12.117")).tests[0].group == \
        "changed observables"


def test_normalizer_numbers_encoded_cache_names_and_cookie_debug_ids():
    n = observables.Normalizer()
    assert n("cache/Ierofs,m3-12x4/@7f/Dm3-12x4") == "cache/Ierofs,m3-#1/@../Dm3-#1"
    assert n("cache/Ierofs,c-bad-magic-12x5/@0a/E1PpjcU9jdLw70") == "cache/Ierofs,c-bad-magic-#1/@../E#1"
    assert n("x/@../E#1") == "x/@../E#1"
    padded = "fsid=k12x3kkkkkkkk,domain_id=d12x4"
    assert n(padded) == "fsid=k#1k+,domain_id=d#1" == n(padded)
    assert observables.Normalizer()("fsid=k1x3kkkkkkkkkk") == "fsid=k#1k+"  # one pid digit less, more filler
    assert observables.Normalizer().kmsg("netfs: O-cookie c=00000023 [fl=6134]") == "netfs: O-cookie c=<hex> [fl=6134]"


def test_observables_file_next_to_junit():
    cfg = SimpleNamespace(getoption=lambda name, default=None: None,
                          option=SimpleNamespace(xmlpath="results/junit-host.xml"))
    assert record.observables_path(cfg) == Path("results/observables-host.jsonl")


# ----------------------------------------------------------------- series and farms
PATCH = """From 1234567890abcdef1234567890abcdef12345678 Mon Sep 17 00:00:00 2001
From: A <a@example.org>
Subject: [PATCH 1/2] erofs: one

---
diff --git a/fs/erofs/fscache.c b/fs/erofs/fscache.c
--- a/fs/erofs/fscache.c
+++ b/fs/erofs/fscache.c
@@ -1,2 +1,2 @@
 static int x;
-static int y = 1;
+static int y = 2;
--
2.39.5

From abcdefabcdefabcdefabcdefabcdefabcdefabcd Mon Sep 17 00:00:00 2001
From: A <a@example.org>
Subject: [PATCH 2/2] erofs: two

---
diff --git a/fs/erofs/fscache.c b/fs/erofs/fscache.c
--- a/fs/erofs/fscache.c
+++ b/fs/erofs/fscache.c
@@ -1,2 +1,2 @@
-static int x;
+static int x = 3;
 static int y = 2;
diff --git a/fs/erofs/new.c b/fs/erofs/new.c
new file mode 100644
--- /dev/null
+++ b/fs/erofs/new.c
@@ -0,0 +1 @@
+int z;
--
2.39.5
"""


def make_tree(root: Path) -> Path:
    (root / "fs" / "erofs").mkdir(parents=True)
    (root / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\n")
    (root / "Kconfig").write_text("")
    (root / "fs" / "erofs" / "fscache.c").write_text("static int x;\nstatic int y = 1;\n")
    (root / "fs" / "erofs" / "super.c").write_text("int s;\n")
    return root


def test_touched_paths_and_split_mbox():
    assert variants.touched_paths(PATCH) == ["fs/erofs/fscache.c", "fs/erofs/new.c"]
    msgs = variants.split_mbox(PATCH)
    assert len(msgs) == 2 and "Subject: [PATCH 2/2]" in msgs[1]


def test_parse_side_forms(tmp_path):
    tree = make_tree(tmp_path / "linux")
    mbox = tmp_path / "v3.mbx"
    mbox.write_text(PATCH)
    image = tmp_path / "bzImage"
    image.write_bytes(bytes(0x202) + b"HdrS" + bytes(0x1fa))  # the x86 boot header's magic, nothing else
    a = variants.parse_side(str(tree), label="A")
    assert a.tree == tree and not a.patches
    b = variants.parse_side(str(mbox), other=a, label="B")
    assert b.tree == tree and b.patches == [mbox]
    assert variants.parse_side(f"{tree}+{mbox}", label="B").patches == [mbox]
    assert variants.parse_side(str(image), label="A").image == image
    assert variants.parse_side("6.1", label="A").version == "6.1"
    assert variants.parse_side("default+" + str(mbox), label="B").patches == [mbox]
    with pytest.raises(variants.deps.ToolError, match="needs a tree"):
        variants.parse_side(str(mbox), other=variants.Side("A", image=image), label="B")
    with pytest.raises(variants.deps.ToolError, match="does not exist"):
        variants.parse_side(str(tmp_path / "nope"), label="A")
    notes = tmp_path / "notes.txt"
    notes.write_text("neither a patch nor a kernel\n")
    with pytest.raises(variants.deps.ToolError, match=r"A: .*notes.txt is not a bzImage"):
        variants.parse_side(str(notes), label="A")


@pytest.fixture
def farm_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EROFS_TEST_CACHE", str(tmp_path / "cache"))
    if subprocess.run(["git", "--version"], capture_output=True).returncode:
        pytest.skip("no git")
    return make_tree(tmp_path / "linux")


def test_farm_applies_a_series_without_touching_the_tree(farm_env):
    tree = farm_env
    series = tree.parent / "v3.mbx"
    series.write_text(PATCH)
    farm = variants.Farm(tree)
    got = farm.prepare([series], {}, log=lambda m: None)
    assert (got / "fs/erofs/fscache.c").read_text() == "static int x = 3;\nstatic int y = 2;\n"
    assert (got / "fs/erofs/new.c").read_text() == "int z;\n"
    assert (tree / "fs/erofs/fscache.c").read_text() == "static int x;\nstatic int y = 1;\n"
    assert not (tree / "fs/erofs/new.c").exists()
    # untouched files are the tree's own (hard links), touched ones private copies
    assert (got / "fs/erofs/super.c").stat().st_ino == (tree / "fs/erofs/super.c").stat().st_ino
    assert (got / "fs/erofs/fscache.c").stat().st_ino != (tree / "fs/erofs/fscache.c").stat().st_ino
    farm.built([series])
    # built, but its build directory is gone (removed to rebuild from cold): applied again
    messages = []
    farm.prepare([series], {}, log=messages.append)
    assert "already holds" not in messages[0] and "1 series applied" in messages[0]
    assert (got / "fs/erofs/fscache.c").read_text() == "static int x = 3;\nstatic int y = 2;\n"
    build = variants.builddir_for(got, {})
    build.mkdir(parents=True)
    (build / "vmlinux").write_bytes(b"")
    farm.built([series])
    # the same series again: nothing is rewritten (nothing to rebuild)
    mtime = (got / "fs/erofs/fscache.c").stat().st_mtime_ns
    messages = []
    farm.prepare([series], {}, log=messages.append)
    assert (got / "fs/erofs/fscache.c").stat().st_mtime_ns == mtime and "already holds" in messages[0]
    # the next series on the same base starts from the base again
    again = farm.prepare([], {}, log=lambda m: None)
    assert (again / "fs/erofs/fscache.c").read_text() == "static int x;\nstatic int y = 1;\n"
    assert not (again / "fs/erofs/new.c").exists()


def test_a_series_that_does_not_apply_names_the_message(farm_env):
    bad = farm_env.parent / "bad.patch"
    bad.write_text(PATCH.replace("-static int y = 1;", "-static int y = 7;"))
    with pytest.raises(variants.deps.ToolError, match=r"message 1: \[PATCH 1/2\] erofs: one\) does not apply"):
        variants.Farm(farm_env).prepare([bad], {}, log=lambda m: None)


# ----------------------------------------------------------------- bisect search
def run_search(n: int, first_bad: int, skip=()) -> tuple[list[int], list[int]]:
    s = bisection.Search([f"c{i}" for i in range(n)])
    order = []
    while (i := s.next()) is not None:
        order.append(i)
        verdict = "skip" if i in skip else ("bad" if i >= first_bad else "good")
        s.steps[i] = bisection.Step(f"c{i}", verdict)
    return s.culprits(), order


def test_search_finds_the_first_bad_commit():
    for first_bad in range(5):
        culprits, order = run_search(5, first_bad)
        assert culprits == [first_bad]
        assert len(order) <= 3


def test_search_steps_around_commits_that_do_not_build():
    culprits, _ = run_search(8, 5, skip={3})
    assert culprits == [5]
    culprits, _ = run_search(8, 4, skip={3})  # 2 good, 3 does not build, 4 bad: either may be it
    assert culprits == [3, 4]
    culprits, _ = run_search(8, 4, skip={3, 4, 5, 6})
    assert culprits == [3, 4, 5, 6, 7]


# ----------------------------------------------------------------- recorder through pytest-xdist
FAKE_TESTS = '''
import errno
from erofs_domains.guest import observables

def test_mounts_pass():
    observables.mount_result("fsid=app1,domain_id=d12x7", 0)
    observables.mount_result("fsid=app2,domain_id=d12x7", errno.ENOBUFS)

def test_rule_fails():
    observables.mount_result("fsid=x,domain_id=d12x9", 0)
    raise AssertionError("RULE BROKEN: shared domain: one OPEN for d12x9\\nthe tables")
'''


def test_observables_reach_the_controller_through_xdist(tmp_path):
    (tmp_path / "test_fake.py").write_text(FAKE_TESTS)
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "fixtures.record", "-p", "no:cacheprovider",
                        "-n", "1", f"--junitxml={tmp_path / 'out' / 'junit.xml'}",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_fake.py")],
                       cwd=repo, capture_output=True, text=True, env={**os.environ,
                                                                      "PYTHONPATH": str(repo)})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    runs = compare.load_runs(tmp_path / "out" / "observables.jsonl")
    assert len(runs) == 1
    passed = runs[0]["test_fake.py::test_mounts_pass"]
    assert passed.outcome == "passed"
    assert passed.observables == {"mount 1": "fsid=app1,domain_id=d#1 -> OK",
                                  "mount 2": "fsid=app2,domain_id=d#1 -> ENOBUFS"}
    failed = runs[0]["test_fake.py::test_rule_fails"]
    assert failed.outcome == "failed" and failed.rule == "RULE BROKEN: shared domain: one OPEN for d#1"
    assert "erofs_observables" not in (tmp_path / "out" / "junit.xml").read_text()


def test_pytest_command_keeps_the_selection_and_adds_the_default_path(tmp_path):
    from erofs_domains.host import suite_run

    cmd = suite_run.pytest_command(Path("/k/bzImage"), tmp_path, ["-k", "domains"])
    assert cmd[-3:] == ["-k", "domains", "tests/fscache"]
    assert f"--junitxml={tmp_path / 'junit.xml'}" in cmd
    node = "tests/fscache/test_domains.py::test_separate_domains_share_nothing"
    assert suite_run.pytest_command(Path("/k/bzImage"), tmp_path, [node])[-1] == node


def test_names_with_a_suffix_and_old_records_are_normalised():
    n = observables.Normalizer()
    assert n("domain_id=x74x36d,domain_id=x74x36d1") == "domain_id=x#1d,domain_id=x#1d1"
    runs = compare.parse_runs([json.dumps({"nodeid": "t", "outcome": "passed", "rule": None,
                                           "observables": {"mount 1": "domain_id=x72x36d -> OK",
                                                           "daemon OPEN erofs,x72x36d/b": 1}})])
    assert runs[0]["t"].observables == {"mount 1": "domain_id=x#1d -> OK", "daemon OPEN erofs,x#1d/b": 1}


# ----------------------------------------------------------------- recorded in VMs (-k domains)
def test_recorded_planted_break_fails_exactly_the_shared_blob_tests():
    """Debian's 6.12.117 against it with erofs_domain_register_cookie() never finding an
    existing cookie (first runs of tools/compare-kernels, recorded)."""
    c = compare.Comparison.of("default", "never-share", compare.load_runs(DATA / "planted-a.jsonl"),
                              compare.load_runs(DATA / "planted-b.jsonl"))
    failing = c.group("newly failing")
    assert {t.nodeid.split("::")[1] for t in failing} == {
        "test_shared_domain_fetches_base_once[2]", "test_shared_domain_fetches_base_once[3]",
        "test_shared_domain_fetches_base_once[8]", "test_separate_domains_share_nothing",
        "test_mixed_topology[fsid-named-like-a-domain]", "test_mixed_topology[one-image-three-ways]",
        "test_mixed_topology[two-domains-and-none]"}
    assert not c.group("changed observables") and c.exit_status == 1
    t = failing[0]
    assert t.rule.startswith("RULE BROKEN: shared domain: every member mounts")
    moved = {k: (a, b) for k, a, b in t.moved}
    assert moved["mount 2"] == ("fsid=base+app2,domain_id=d#1 -> OK", "fsid=base+app2,domain_id=d#1 -> EINVAL")


def test_recorded_identical_kernels_report_no_change():
    """The same kernel on both sides; one test's domain names carry a suffix (x74x36d1),
    which the recorder of that run did not normalise yet: the reader does."""
    c = compare.Comparison.of("default", "default", compare.load_runs(DATA / "same-a.jsonl"),
                              compare.load_runs(DATA / "same-b.jsonl"))
    assert len(c.unchanged) == len(c.tests) == 12 and c.exit_status == 0


# ----------------------------------------------------------------- the tool's runs, with a fake runner
def _compare_kernels_module():
    import importlib.machinery
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "compare-kernels"
    loader = importlib.machinery.SourceFileLoader("compare_kernels", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("compare_kernels", loader))
    loader.exec_module(module)
    return module


BUG_TEST = "tests/fscache/test_domain_conflicts.py::test_device_naming_a_member_fsid_shares_its_primary_cookie"
FILE_TEST = "tests/fscache/test_bad_input.py::test_mount_options[domain-no-fsid-file]"
BANNER = "kmsg [log] erofs: (device erofs): {} fscache-based on-demand read feature in use. Use at your own risk!"


def _fake_outcomes(side: str, tag: str) -> dict:
    """A 6.1-like A against a 6.12-like B: T1 breaks on B, T5 fails on B's first run only,
    T3 moves only as rule ondemand_deprecated says, a known-bug skip and a version-rule skip."""
    first = tag == "run"
    banner = {"A": ("does not hold", "EXPERIMENTAL"), "B": ("holds", "[deprecated]")}[side]
    out = {
        T1: ("failed", "RULE BROKEN: shared domain: one OPEN") if side == "B" else ("passed", None),
        T5: ("failed", "RULE BROKEN: no ENOBUFS") if side == "B" and first else ("passed", None),
        T3: ("passed", None, {"rule ondemand_deprecated": banner[0], BANNER.format(banner[1]): 1}),
    }
    if first:
        out[BUG_TEST] = ("skipped", "known kernel bug on 6.1.192 (rule bug_shared_primary_inode, 6.1 - 6.2): "
                         "probed in a VM of its own by tests/host") if side == "A" else ("passed", None)
        out[FILE_TEST] = ("skipped", "rule file_backed_mount (>= 6.12) does not apply to kernel 6.1.192: the "
                          "source must be a block device (ENOTBLK)") if side == "A" else ("passed", None)
    return out


def test_compare_kernels_reruns_differences_and_probes_known_bugs(tmp_path, monkeypatch):
    """The tool's sequence with a fake runner: first runs, a rerun per --reruns of only the tests
    that differ (not what the rule table declares), the known bug's probe on the side that skipped it."""
    ck = _compare_kernels_module()
    from erofs_domains.host import kernel_build as kernel
    from erofs_domains.host import suite_run

    images = {"A": tmp_path / "a" / "bzImage", "B": tmp_path / "b" / "bzImage"}
    monkeypatch.setattr(kernel, "bzimage_release", lambda p: "6.1.192" if p == images["A"] else "6.12.117")
    started = []

    def fake_run_parallel(runs, env, log=print, lock=None):
        for r in runs:
            started.append((r.label, r.outdir.name, [a for a in r.cmd if a.startswith("tests/")]))
            r.outdir.mkdir(parents=True, exist_ok=True)
            if r.label.endswith("probe"):
                recs = [{"nodeid": compare.BUG_PROBES["bug_shared_primary_inode"], "outcome": "xfailed",
                         "rule": "known kernel bug (rule bug_shared_primary_inode): inode outlives its superblock",
                         "detail": ["VFS: Busy inodes after unmount of erofs", "general protection fault"]}]
            else:
                recs = [{"nodeid": n, "outcome": o[0], "rule": o[1], "observables": o[2] if len(o) > 2 else {}}
                        for n, o in _fake_outcomes(r.label, r.outdir.name).items()
                        if r.outdir.name == "run" or n in r.cmd]
            r.observables.write_text("".join(json.dumps(x) + "\n" for x in recs))
            r.returncode = 0

    monkeypatch.setattr(suite_run, "run_parallel", fake_run_parallel)
    out = tmp_path / "out"

    def runs(tag, extra):
        return [suite_run.SuiteRun(s, images[s], out / s / tag,
                                   suite_run.pytest_command(images[s], out / s / tag, extra)) for s in ("A", "B")]

    args = SimpleNamespace(reruns=2, pytest_args=["-k", "domains"], seed="1", hypothesis_seed="0")
    side = SimpleNamespace(describe=lambda: "a side")
    status = ck.compare_runs(args, side, side, images, {"A": 1.0, "B": 2.0}, 0.0, {}, runs,
                             ["--hypothesis-seed=0", "-k", "domains"], out, 0.0)
    assert status == 1
    assert [(label, tag) for label, tag, _ in started] == [
        ("A", "run"), ("B", "run"), ("A", "rerun1"), ("B", "rerun1"), ("A", "rerun2"), ("B", "rerun2"),
        ("A probe", "host")]
    # the differing tests only, without -k and the default path; not T3, whose every move is a
    # rule that differs between the kernels (nor the declared skips)
    assert started[2][2] == [T1, T5]
    assert started[4][2] == [T1]  # T5 passed its first rerun on B: flaky already, not rerun again
    report = json.loads((out / "report.json").read_text())
    groups = {g: [t["nodeid"] for t in ts] for g, ts in report["groups"].items() if ts}
    assert groups == {"newly failing": [T1], "flaky": [T5], "changed by rules": [T3],
                      "known kernel bug": [BUG_TEST], "version rule skip": [FILE_TEST]}
    bug = report["groups"]["known kernel bug"][0]
    assert bug["declared"]["doc"] == "docs/known-bugs/erofs-6.1-shared-primary-cookie.md"
    assert bug["probe"]["console"] == ["VFS: Busy inodes after unmount of erofs", "general protection fault"]
    assert report["groups"]["version rule skip"][0]["declared"]["rule"] == "file_backed_mount"
    md = (out / "report.md").read_text()
    assert ("Reruns: 2 test(s) differed in the first runs and ran 2 more time(s) on each side: "
            "1 confirmed, 1 flaky (1 found flaky earlier and not rerun again)") in md
    assert "| file_backed_mount" in md and "general protection fault" in md
    assert "| ondemand_deprecated" in md


def test_a_plain_unified_diff_is_a_series(tmp_path):
    """`diff -u` output starts with `--- a/...` on its first line: still a patch, never a bzImage."""
    patch = tmp_path / "break.patch"
    patch.write_text("--- a/fs/erofs/fscache.c\n+++ b/fs/erofs/fscache.c\n@@ -1 +1 @@\n-x\n+y\n")
    assert variants.is_series(patch)
    assert variants.parse_side(str(patch), variants.Side("A", version="6.12"), "B").patches == [patch]
