"""The settings a run was given reach the guests, and the reproduce line reruns a test
the way the run ran it (fixtures/reproduce.py, vm.guest_env, fixtures/crash_report.py).

Before: EROFS_TEST_SEED, EROFS_TEST_WORK and EROFS_TEST_ACCEL stopped at the VM wrapper
(the host built seed N's images, the guests used seed 1), and the reproduce line dropped
--kernel-profile and said `tox -e vm` in host mode too."""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from vmtest import vm  # noqa: E402

from fixtures import crash_report, reproduce  # noqa: E402
from fixtures.paths import work_root  # noqa: E402

NODE = "tests/fscache/test_domains.py::test_shared_domain_shares_cookies[2]"


# ----------------------------------------------------------------- forwarded environment
def test_the_guest_gets_every_erofs_test_setting(monkeypatch):
    for k in list(os.environ):
        if k.startswith("EROFS_TEST_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("EROFS_TEST_SEED", "7")
    monkeypatch.setenv("EROFS_TEST_WORK", "/tmp/w")
    monkeypatch.setenv("EROFS_TEST_ACCEL", "tcg")
    monkeypatch.setenv("HOME", "/root")
    env = vm.guest_env({"EROFS_TEST_IN_VM": "1"})
    assert env["EROFS_TEST_SEED"] == "7" and env["EROFS_TEST_WORK"] == "/tmp/w"
    assert env["EROFS_TEST_ACCEL"] == "tcg" and env["EROFS_TEST_IN_VM"] == "1"
    assert "HOME" not in env, "only what the guest reads"


def test_every_setting_the_tests_read_is_forwarded():
    """Any EROFS_TEST_* or other variable read under fixtures/ or tests/fscache reaches the
    guest: a setting added later cannot silently stop at the VM wrapper."""
    read = set()
    for path in [*(REPO / "fixtures").rglob("*.py"), *(REPO / "tests" / "fscache").rglob("*.py")]:
        read |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["']([A-Z_]+)["']""", path.read_text()))
        read |= set(re.findall(r"""getenv\(\s*["']([A-Z_]+)["']""", path.read_text()))
    env = {name: "x" for name in read}
    forwarded = {k for k in env if k in vm.FORWARDED_ENV or k.startswith(vm.FORWARDED_PREFIX)}
    set_in_guest = {"PYTEST_XDIST_WORKER"}  # xdist sets it in the worker
    assert read - forwarded - set_in_guest == set()
    assert {"EROFS_TEST_SEED", "EROFS_TEST_WORK"} <= read


def test_one_work_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EROFS_TEST_WORK", str(tmp_path / "w"))
    assert work_root() == tmp_path / "w" and work_root().is_dir()
    sources = [*(REPO / "fixtures").rglob("*.py"), *(REPO / "tests").rglob("*.py")]
    hard_coded = [str(p.relative_to(REPO)) for p in sources
                  if "/tmp/erofs-fscache-tests" in p.read_text() and p.name != "paths.py"
                  and p.name != Path(__file__).name]
    assert hard_coded == [], "the scratch root is fixtures.paths.work_root()"


# ----------------------------------------------------------------- reproduce line
def test_reproduce_line_in_vm_mode_names_profile_kernel_tree_mkfs_seed_and_strictness(tmp_path):
    opts = {"kernel_src": str(tmp_path / "linux"), "kernel_profile": "debug", "strict": True,
            "test_timeout": 300.0}
    env = {"MKFS_EROFS": str(tmp_path / "mkfs.erofs"), "EROFS_TEST_SEED": "7", "HOME": "/root"}
    prefix = shlex.join(reproduce.run_prefix(opts, env, "vm"))
    line = reproduce.reproduce_command(prefix, NODE)
    assert shlex.split(line) == [
        "env", "EROFS_TEST_SEED=7", *reproduce.VM_RUNNER,
        "--kernel-src", str(tmp_path / "linux"), "--mkfs", str(tmp_path / "mkfs.erofs"),
        "--kernel-profile", "debug", "--strict", "--test-timeout", "300", NODE]


def test_reproduce_line_with_defaults_is_short():
    prefix = shlex.join(reproduce.run_prefix({"kernel_profile": "default", "test_timeout": 120.0}, {}, "vm"))
    assert reproduce.reproduce_command(prefix, NODE) == (
        f".tox/vm/bin/pytest --dist load --tx popen//python=tools/vm-python '{NODE}'")


def test_reproduce_line_in_host_mode_runs_pytest_here():
    line = shlex.join(reproduce.run_prefix({"strict": False, "kernel_profile": "debug"},
                                           {"EROFS_TEST_STRICT": "1"}, "host"))
    assert line == "pytest --host-mode --strict", "no VM options, no tox -e vm"


def test_the_controller_hands_the_line_to_the_guests():
    assert reproduce.ENV.startswith(vm.FORWARDED_PREFIX)


# ----------------------------------------------------------------- worker crash report
def test_a_worker_crash_report_gets_the_wrappers_account(tmp_path):
    console = tmp_path / "console"
    console.mkdir()
    since = time.time() - 1
    (console / "worker-031500-4242.crash").write_text(
        "vm: the guest kernel crashed (kernel BUG at fs/erofs/fscache.c:624!)\n[ 41.2] RIP: 0010:x\n")
    (console / "worker-031500-999.crash").write_text("another worker's\n")
    node = SimpleNamespace(gateway=SimpleNamespace(_io=SimpleNamespace(popen=SimpleNamespace(pid=4242))))
    report = SimpleNamespace(longrepr=f"worker 'gw0' crashed while running '{NODE}'", sections=[], node=node)
    crash_report.explain_crash(report, console, since, "tools/tox -e vm -- x")
    assert "kernel BUG at fs/erofs/fscache.c:624!" in report.longrepr and "RIP" in report.longrepr
    assert "another" not in report.longrepr
    assert ("reproduce", "tools/tox -e vm -- x") in report.sections
    assert ("console log", str(console / "worker-031500-4242.log")) in report.sections


def test_a_worker_crash_without_an_account_says_so(tmp_path):
    report = SimpleNamespace(longrepr="worker 'gw1' crashed", sections=[], node=None)
    crash_report.explain_crash(report, tmp_path, time.time(), "r", wait=0)
    assert "left no account" in report.longrepr


@pytest.mark.parametrize("spec,n", [(["2*popen//python=tools/vm-python"], 2), (["popen//python=x"], 1), ([], 0)])
def test_worker_count(spec, n):
    import conftest

    assert conftest.worker_count(SimpleNamespace(getoption=lambda name, default=None: spec)) == n
