"""tox's two legs share {posargs}: each runs the paths it owns, and only those."""

from pathlib import Path

import pytest

from erofs_domains.host import legs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_no_paths_named_runs_the_legs_directories():
    assert legs.select("vm", None, REPO) == [str(REPO / "tests/fscache"), str(REPO / "tests/pagecache")]
    assert legs.select("host", None, REPO) == [str(REPO / "tests/host")]


@pytest.mark.parametrize("named, vm, host", [
    (["tests/pagecache"], ["tests/pagecache"], []),
    (["tests/fscache/test_domains.py::test_x[a]", "tests/host/test_vm_guard.py"],
     ["tests/fscache/test_domains.py::test_x[a]"], ["tests/host/test_vm_guard.py"]),
    (["./tests/host/"], [], ["./tests/host/"]),
    (["tests/unit"], [], []),
    (["tests/fscachex"], [], []),  # a sibling whose name starts the same is not under tests/fscache
])
def test_named_paths_go_to_the_leg_that_owns_them(named, vm, host):
    assert legs.select("vm", named, REPO) == vm
    assert legs.select("host", named, REPO) == host


def test_absolute_paths_and_other_working_directories(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO / "tests")
    assert legs.select("host", ["host/test_kernel_bug.py"], REPO) == ["host/test_kernel_bug.py"]
    assert legs.owns("vm", str(REPO / "tests/pagecache/test_lifecycle.py"), REPO)
    assert not legs.owns("vm", str(tmp_path / "tests/pagecache"), REPO)


def test_a_leg_left_empty_says_what_it_dropped():
    assert "tests/unit" in legs.nothing_selected("host", ["tests/unit"])
    assert "tests/host" in legs.nothing_selected("host", ["tests/unit"])
