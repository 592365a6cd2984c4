"""erofs_domains/guest/pagecache/doors.py: every door returns a file's bytes as the file holds them (run on a
file of this host), the twin oracle flags what differs unless a rule explains it, and the doors
table renders from a run's rows (tools/outcome-table --pagecache-doors)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from erofs_domains.base.proc import cmd
from erofs_domains.guest.pagecache import doors
from erofs_domains.guest.pagecache.image_set import SHAPES
from erofs_domains.guest.pagecache.images import write_sparse

REPO = Path(__file__).resolve().parents[2]


def test_every_file_operations_entry_has_a_door_and_every_door_an_entry():
    names = {d.name for d in doors.DOORS}
    paths = {**doors.FOPS_ENTRIES, **doors.INODE_PATHS}
    missing = {e: [x for x in ds if x not in names] for e, ds in paths.items()}
    assert not any(missing.values()), missing
    used = {x for ds in paths.values() for x in ds}
    assert names == used, f"doors no file_operations entry names: {names - used}"
    # erofs_ishare_fops and erofs_file_fops of 7.2, every entry
    assert {"open", "release", "llseek", "read_iter", "mmap", "get_unmapped_area", "splice_read", "fadvise",
            "unlocked_ioctl", "compat_ioctl", "setlease"} == set(doors.FOPS_ENTRIES)


@pytest.mark.parametrize("shape", ["1-byte", "3-pages+1", "sparse"])
def test_data_doors_return_the_files_bytes(tmp_path, shape):
    data = SHAPES[shape]
    write_sparse(tmp_path / shape, data)
    bad = {}
    for d in doors.DOORS:
        seen = d.run(tmp_path / shape, len(data), tmp_path)
        errs = doors.manifest_errors(seen, data)
        if errs:
            bad[d.name] = errs
    assert not bad


def test_manifest_errors_name_the_offset():
    want = b"abcdefgh"
    assert doors.manifest_errors({"pieces": [(0, 8, b"abcdefgh")]}, want) == []
    assert doors.manifest_errors({"pieces": [(2, 4, b"cdXf")]}, want) == [
        "at offset 2: 4 bytes, the image has 4; first difference at +2"]
    assert doors.manifest_errors({"pieces": [(0, 8, b"abc")]}, want) == [
        "at offset 0: 3 bytes, the image has 8; first difference at +3"]
    assert doors.manifest_errors({"pieces": [], "past_eof_zero": False}, want) == [
        "bytes past EOF in the last mapped page are not zero"]


def test_twin_oracle_flags_differences_a_rule_does_not_explain():
    v = doors.compare("o-direct", "one-block", "plain", True, {"open": "EINVAL", "x": 1},
                      {"open": 0, "pieces": [(0, 3, b"abc")], "x": 2}, b"abc")
    assert [(k, r) for k, _, _, r in v.differs] == [("open", "NO_DIRECT_IO"), ("pieces", "NO_DIRECT_IO"), ("x", None)]
    assert v.unexplained and v.result().startswith("DIFFERS from twin: x")
    # a rule explains only what it predicts: another errno is not NO_DIRECT_IO's
    v = doors.compare("o-direct", "one-block", "plain", True, {"open": "EPERM"}, {"open": 0}, b"abc")
    assert v.unexplained
    # the same difference on a file that is not shared is not the rule's
    v = doors.compare("o-direct", "empty", "plain", False, {"open": "EINVAL"}, {"open": 0}, b"")
    assert v.unexplained
    v = doors.compare("ioctl-getfslabel", "1-byte", "plain", True, {"label": "ENOTTY"}, {"label": ""}, b"x")
    assert not v.unexplained and "rule NO_IOCTL" in v.result()
    v = doors.compare("read", "1-byte", "plain", True, {"pieces": [(0, 1, b"y")]}, {"pieces": [(0, 1, b"y")]}, b"x")
    assert not v.differs and v.result().startswith("WRONG DATA: shared: at offset 0")


def test_runs():
    assert doors.runs([1, 1, 0, 1, 0, 0, 1, 1, 1]) == "0-1,3,6-8"
    assert doors.runs([0, 0]) == "none"


def test_doors_table_renders_from_the_rows(tmp_path):
    t = tmp_path / "tests" / "x"
    t.mkdir(parents=True)
    rows = [{"door": "read", "shape": "1-byte", "layout": "plain", "ok": True, "result": "= image", "kernel": "7.2.13"},
            {"door": "splice-pipe", "shape": "1-byte", "layout": "lz4", "ok": False, "result": "NOT SHARED: x",
             "kernel": "7.2.13"}]
    (t / "doors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tmp_path / "doc.md"
    doc.write_text("a\n<!-- doors-table:begin -->\nold\n<!-- doors-table:end -->\nb\n")
    r = cmd([sys.executable, REPO / "tools" / "outcome-table", "--pagecache-doors", tmp_path, "--write", doc],
            check=False, cwd=REPO)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert "| read | 1-byte | = image | (not run) | (not run) |" in text
    assert "| splice-pipe | 1-byte | (not run) | (not run) | **FAILS**: NOT SHARED: x |" in text
    assert "old" not in text and text.endswith("<!-- doors-table:end -->\nb\n")
    r = cmd([sys.executable, REPO / "tools" / "outcome-table", "--pagecache-doors", tmp_path / "none"],
            check=False, cwd=REPO)
    assert r.returncode == 2 and "no doors.jsonl rows" in r.stderr
    assert isinstance(r, subprocess.CompletedProcess)


def test_rules_check_what_they_predict():
    size = 1 << 20
    seek = doors.compare("lseek", "sparse", "chunked", True, {"HOLE 0": size, "DATA 4096": 4096},
                         {"HOLE 0": 4096, "DATA 4096": 524288}, bytes(size))
    assert [r for *_, r in seek.differs] == ["GENERIC_SEEK", "GENERIC_SEEK"]
    wrong = doors.compare("lseek", "sparse", "chunked", True, {"HOLE 0": 4096 * 3}, {"HOLE 0": 4096}, bytes(size))
    assert wrong.unexplained
    ra = doors.compare("readahead", "big", "plain", True, {"resident_after": "0-31"},
                       {"resident_after": "0-319"}, bytes(size))
    assert not ra.unexplained
    ra = doors.compare("readahead", "big", "plain", True, {"resident_after": "0-15"},
                       {"resident_after": "0-319"}, bytes(size))
    assert ra.unexplained
