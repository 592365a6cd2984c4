"""The page-cache sharing failure report (erofs_domains/guest/pagecache/harness.py) names the broken rule
and shows what each mount sees, without a kernel."""

from erofs_domains.guest.pagecache.harness import Row, Sharing


class FakeMounts:
    def table(self):
        return [("m1", "/dev/loop1", "bdev", "ro,inode_share", "7:1"),
                ("m2", "/dev/loop2", "bdev", "ro,inode_share", "7:2")]


def test_row_ok_compares_fops_and_resident_pages():
    assert Row("m1", "a", "shared", "shared", 16, 16, True, "#1", "KEY").ok
    assert not Row("m1", "a", "shared", "shared", 16, 16, False, "#1", "KEY").ok
    assert not Row("m1", "a", "own", "shared", 0, 16, False, "#1", "KEY").ok
    assert Row("m1", "empty", "own", "own", 0, 0, True, "-", "NO_DIGEST").ok


def test_report_names_the_rule_and_tables():
    s = Sharing(FakeMounts())
    s.steps = ["mount base.erofs as m1", "mount base.erofs as m2", "read m1/a"]
    rows = [Row("m1", "a", "shared", "shared", 16, 16, True, "#1", "KEY"),
            Row("m2", "a", "shared", "shared", 16, 16, False, "#2", "KEY")]
    text = s.report(rows, [rows[1]], "reading a through m1")
    assert text.startswith("rule KEY broken: inodes share when domain id + NUL + digest value are equal")
    assert "after: reading a through m1" in text
    assert "<-- differs" in text and "16/16" in text and "0/16" in text
    assert "/dev/loop2" in text and "3. read m1/a" in text


def test_report_names_the_data_rule_first():
    s = Sharing(FakeMounts())
    s.bad_data = [("m2", "q", 32768, 32768, 0)]
    text = s.report([], [], "")
    assert text.startswith("rule DATA broken")
    assert "first difference at" in text
