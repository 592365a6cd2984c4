"""The run configuration (erofs_domains/base/config.py) reaches the guests whole, every
writer finds the results folder asked for, --require-features is the suite's own switch, and
the reproduce line reruns a test the way the run ran it (erofs_domains/host/reproduce.py,
vm.guest_env, erofs_domains/host/crash_report.py)."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from erofs_domains.base import config
from erofs_domains.base.scratch import work_root
from erofs_domains.host import crash_report, legs, reproduce, vm

REPO = Path(__file__).resolve().parents[2]

NODE = "tests/fscache/test_domains.py::test_shared_domain_shares_cookies[2]"


# ----------------------------------------------------------------- the run configuration reaches the guests
def test_the_guest_gets_the_run_configuration_and_nothing_else(monkeypatch):
    for k in list(os.environ):
        if k.startswith("EROFS_TEST_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("EROFS_TEST_SEED", "7")
    monkeypatch.setenv("EROFS_TEST_WORK", "/tmp/w")
    monkeypatch.setenv("EROFS_TEST_ACCEL", "tcg")
    monkeypatch.setenv("HOME", "/root")
    env = vm.guest_env(config.current().replace(in_vm=True))
    assert env["EROFS_TEST_SEED"] == "7" and env["EROFS_TEST_WORK"] == "/tmp/w"
    assert env["EROFS_TEST_ACCEL"] == "tcg" and env["EROFS_TEST_IN_VM"] == "1"
    assert "HOME" not in env, "only what the guest reads"
    assert config.RunConfig.from_environment(env) == config.current().replace(in_vm=True), \
        "the guest reads back exactly the configuration it was given"


def test_every_setting_round_trips_through_the_environment(tmp_path):
    run = config.RunConfig(results=tmp_path / "r", cache=tmp_path / "c", work=tmp_path / "w", kernel=tmp_path / "k",
                           kernel_src=tmp_path / "s", kernel_version="6.1", kernel_profile="debug", mkfs="/m",
                           dump="/d", fsck="/f", erofs_utils_src=tmp_path / "e", erofs_utils_configure_flags="-x",
                           require_features=True, seed=9, test_timeout=30.0, accel="tcg", vm_lifetime=5.0,
                           probe=False, daemon_spawn="exec", python="/p", reproduce="r", in_vm=True,
                           vm_state=tmp_path / "st", hypothesis_profile="long", ci=True)
    assert config.RunConfig.from_environment(run.environment()) == run
    assert {f.name for f in dataclasses.fields(run)} == {field for field, _ in config.FIELDS.values()}, \
        "every setting has its variable"


SETTING_READ = re.compile(r"""(environ(\.get\(|\[)|getenv\()\s*["'](EROFS_|MKFS_|DUMP_|FSCK_|CI["']|HYPOTHESIS)""")


def test_no_module_resolves_a_setting_from_the_environment():
    """Settings are read in erofs_domains/base/config.py only (and set up for child processes
    elsewhere): a module that reads EROFS_TEST_* or MKFS_EROFS itself bypasses --results,
    --require-features and the rest."""
    readers = []
    for top in ("erofs_domains", "fixtures", "tests/fscache", "tests/pagecache", "tests/host"):
        for path in (REPO / top).rglob("*.py"):
            if path.name == "config.py" and path.parent.name == "base":
                continue
            text = path.read_text()
            if SETTING_READ.search(text):
                readers.append(str(path.relative_to(REPO)))
    assert readers == []


def test_one_work_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EROFS_TEST_WORK", str(tmp_path / "w"))
    assert work_root() == tmp_path / "w" and work_root().is_dir()
    sources = [p for top in ("erofs_domains", "fixtures", "tests") for p in (REPO / top).rglob("*.py")]
    hard_coded = [str(p.relative_to(REPO)) for p in sources
                  if "/tmp/erofs-fscache-tests" in p.read_text() and p.name != "config.py"
                  and p.name != Path(__file__).name]
    assert hard_coded == [], "the scratch root is the run configuration's `work`"


def test_results_given_once_reach_every_writer(tmp_path, monkeypatch):
    """--results DIR: the artifacts, the crash reports' console folder and the Hypothesis
    databases all go there (they are resolved from the run configuration when used, not
    fixed when a module is imported)."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # install() below rewrites this process's environment
    from fixtures import plugin

    config.install(config.current().replace(results=tmp_path / "asked", ci=False))  # CI keeps no database
    try:
        assert plugin.test_dir("tests/fscache/test_x.py::t").is_relative_to(tmp_path / "asked")
        assert plugin.results_dir() == tmp_path / "asked"
        db = plugin.model_database("hypothesis")
        assert Path(db.path).is_relative_to(tmp_path / "asked")
    finally:
        config.forget()
    assert not hasattr(plugin, "RESULTS"), "no results folder fixed at import"


# ----------------------------------------------------------------- --require-features, not pytest's --strict
def _header(*args, env=None) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
                        "-p", "no:xdist", *args, str(REPO / "tests" / "unit" / "test_layers.py"), "-k", "no_such_test"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in {**os.environ, **(env or {})}.items()
                            if k not in ("EROFS_TEST_STRICT", "EROFS_TEST_REQUIRE_FEATURES") or k in (env or {})})
    lines = [line for line in r.stdout.splitlines() if line.startswith("--require-features:")]
    assert lines, r.stdout[-2000:] + r.stderr[-2000:]
    return lines[0]


def test_pytests_own_strict_does_not_switch_the_suites_mode():
    assert _header("--strict") == "--require-features: off"
    assert _header("-o", "strict=true") == "--require-features: off"


def test_the_suites_option_and_its_environment_names_do():
    assert _header("--require-features") == "--require-features: on"
    assert _header(env={"EROFS_TEST_STRICT": "1"}) == "--require-features: on"
    assert _header(env={"EROFS_TEST_REQUIRE_FEATURES": "1"}) == "--require-features: on"


# ----------------------------------------------------------------- reproduce line
def test_reproduce_line_in_vm_mode_names_series_profile_tree_mkfs_seed_and_requirement(tmp_path):
    given = config.RunConfig(kernel_src=tmp_path / "linux", kernel_version="6.1", kernel_profile="debug",
                             require_features=True, test_timeout=300.0, mkfs=str(tmp_path / "mkfs.erofs"), seed=7)
    line = reproduce.reproduce_command(shlex.join(reproduce.run_prefix(given, "vm")), NODE)
    assert shlex.split(line) == [
        "env", "EROFS_TEST_SEED=7", *reproduce.VM_RUNNER,
        "--kernel-src", str(tmp_path / "linux"), "--kernel-version", "6.1", "--kernel-profile", "debug",
        "--mkfs", str(tmp_path / "mkfs.erofs"), "--require-features", "--test-timeout", "300", NODE]


def test_a_failure_on_another_series_reruns_on_that_series():
    """A run of --kernel-version 6.1 must not print a line that reruns on the default 6.12."""
    for mode in ("vm", "controller"):
        assert "--kernel-version 6.1" in shlex.join(reproduce.run_prefix(config.RunConfig(kernel_version="6.1"), mode))


def test_reproduce_line_with_defaults_is_short():
    prefix = shlex.join(reproduce.run_prefix(config.RunConfig(), "vm"))
    assert reproduce.reproduce_command(prefix, NODE) == (
        f".tox/vm/bin/pytest --dist load --tx popen//python=tools/vm-python '{NODE}'")


def test_reproduce_line_in_host_mode_runs_pytest_here():
    line = shlex.join(reproduce.run_prefix(config.RunConfig(require_features=True, kernel_profile="debug"), "host"))
    assert line == "pytest --host-mode --require-features", "no VM options, no tox -e vm"


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
    assert legs.vm_workers(spec) == (n if any("vm-python" in s for s in spec) else 0)
