"""Every tool, and the suite's pytest options, refuse bad input first (erofs_domains/host/validate.py).

Each case runs the tool as a user would, with $EROFS_TEST_CACHE an empty directory of its own,
and asserts: a non-zero status, one line that names what is wrong (and what would be right),
little CPU (a refusal reads a few bytes; 5 s of CPU would be a build or an image set), and that
nothing was built, downloaded, created or pruned: the cache stays empty and the scratch
directory holds exactly what the test put there.  Inputs that would start a build if the check
were gone are chosen so that the build fails fast instead (a fake tree, a file:// mirror).
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"

from erofs_domains.host import validate  # noqa: E402

CPU_BOUND = 5.0  # seconds of CPU for a refusal, the tool and its children together
WALL_BOUND = 60.0  # a loaded machine (builds beside us) may stretch the wall clock, not the CPU


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    cpu: float
    wall: float

    def lines(self) -> list[str]:
        return [line for line in (self.err or self.out).splitlines() if line.strip()]


def tree(root: Path) -> dict[str, int]:
    """What a directory holds: relative path -> size (-1 for a directory)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (-1 if p.is_dir() else p.stat().st_size) for p in sorted(root.rglob("*"))}


class Scratch:
    """A scratch directory with the inputs the cases name, and an empty cache root."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.cache.mkdir()
        (root / "empty").mkdir()
        (root / "file.txt").write_text("not what was asked for\n")
        (root / "notbz").write_bytes(os.urandom(8192))  # no boot header
        (root / "short").write_text("tiny\n")
        head = bytearray(0x400)
        head[validate.BZIMAGE_MAGIC_OFFSET:validate.BZIMAGE_MAGIC_OFFSET + 4] = validate.BZIMAGE_MAGIC
        (root / "fakebz").write_bytes(bytes(head))  # passes the header check; boots nothing
        kt = root / "faketree"  # passes is_kernel_tree; `make` fails at once in it
        (kt / "fs" / "erofs").mkdir(parents=True)
        (kt / "Makefile").write_text("all:\n\tfalse\n")
        (kt / "Kconfig").write_text("")
        et = root / "fakeutils"  # passes the erofs-utils tree check; autogen fails at once
        (et / "mkfs").mkdir(parents=True)
        (et / "configure.ac").write_text("")
        (root / "readme.md").write_text("# no outcome-table markers here\n")
        self.before = tree(root)

    def sub(self, args: list[str]) -> list[str]:
        return [a.replace("{S}", str(self.root)) for a in args]

    def unchanged(self) -> None:
        made = sorted(tree(self.cache))
        if made:
            raise AssertionError(f"the cache got entries: {made[:6]}")
        after = tree(self.root)
        if after != self.before:
            raise AssertionError(f"the scratch directory changed: new {sorted(set(after) - set(self.before))[:6]}, "
                                 f"gone {sorted(set(self.before) - set(after))[:6]}")


@pytest.fixture
def scratch(tmp_path):
    return Scratch(tmp_path)


def clean_env(scratch: Scratch, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The user's environment without the suite's variables or an outer pytest's, and the
    scratch cache; {S} in a value is the scratch directory."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EROFS_TEST_", "PYTEST_")) and k not in ("MKFS_EROFS", "DUMP_EROFS", "FSCK_EROFS")}
    env["EROFS_TEST_CACHE"] = str(scratch.cache)
    env["EROFS_TEST_PROBE"] = "0"
    for k, v in (extra or {}).items():
        env[k] = v.replace("{S}", str(scratch.root))
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> Outcome:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=WALL_BOUND,
                       stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Outcome(r.returncode, r.stdout, r.stderr, cpu, wall)


def refused(scratch: Scratch, argv: list[str], says: str, env: dict[str, str] | None = None,
            one_line: bool = True, cwd: Path | None = None) -> Outcome:
    """Run `argv`; fail with every rule it broke: accepted, no word on what is wrong, more than
    one line, a traceback, a build's worth of CPU, or anything created in the cache or scratch."""
    argv = scratch.sub(argv)
    o = run(argv, clean_env(scratch, env), cwd or scratch.root)
    shown = (o.err.strip() or o.out.strip())[-1500:]
    says = says.replace("{S}", str(scratch.root))
    broken = []
    if o.rc == 0:
        broken.append("it was accepted (exit 0)")
    if says not in o.err + o.out:
        broken.append(f"the message does not say {says!r}")
    if one_line and len(o.lines()) != 1:
        broken.append(f"want one line on what is wrong, got {len(o.lines())}")
    if "Traceback" in o.err:
        broken.append("a traceback instead of a message")
    if o.cpu >= CPU_BOUND:
        broken.append(f"{o.cpu:.1f} s of CPU before refusing (a build or an image set?)")
    try:
        scratch.unchanged()
    except AssertionError as e:
        broken.append(str(e))
    if broken:
        pytest.fail(f"{shlex.join(argv)}:\n  " + "\n  ".join(broken) + f"\noutput:\n{shown}", pytrace=False)
    return o


def tool(name: str) -> list[str]:
    return [str(TOOLS / name)]


def ident(value) -> str:
    """A case's id: its arguments (the message and the environment are in the assertion)."""
    if isinstance(value, list):
        return " ".join(value).replace("{S}/", "").replace("tests/", "")[-48:] or "no-args"
    if isinstance(value, dict):
        return "+".join(f"{k}={v}".replace("{S}/", "") for k, v in value.items())
    return ""


# ----------------------------------------------------------------------------------- the check


def test_bzimage_check_reads_the_boot_header(tmp_path):
    s = Scratch(tmp_path)
    assert validate.bzimage_problem(s.root / "fakebz") is None
    assert "no x86 boot header" in validate.bzimage_problem(s.root / "notbz")
    assert "shorter than the x86 boot header" in validate.bzimage_problem(s.root / "short")
    assert validate.bzimage_problem(s.root / "empty") == "is a directory"
    assert validate.bzimage_problem(s.root / "nosuch") == "does not exist"
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + bytes(0x400))
    assert "ELF file (vmlinux?)" in validate.bzimage_problem(elf)
    built = sorted((Path(os.environ.get("EROFS_TEST_CACHE") or Path.home() / ".cache/erofs-fscache-tests")
                    / "kernels").glob("*/bzImage"))
    if built:  # a real one, when this machine has built a kernel
        assert validate.bzimage_problem(built[0]) is None


# ------------------------------------------------------------------------------ compare-kernels


@pytest.mark.parametrize("args, says, env", [
    (["--report-only"], "argument --report-only: expected one argument", None),
    (["--report-only", "{S}/no/such/compare"], "--report-only {S}/no/such/compare does not exist", None),
    (["--report-only", "{S}/empty"], "holds no comparison's runs", None),
    (["--report-only", ""], "argument --report-only: an empty path", None),
    (["{S}/notbz", "6.12"], "A: {S}/notbz is not a bzImage: no x86 boot header", None),
    (["{S}/nosuch", "6.12"], "A: {S}/nosuch does not exist", None),
    (["{S}/fakebz", "{S}/fakebz", "--vms", "0"], "argument --vms: 0 is too small", None),
    (["{S}/fakebz", "{S}/fakebz"], "$EROFS_TEST_VMS: 'two' is not a whole number", {"EROFS_TEST_VMS": "two"}),
    (["{S}/fakebz", "{S}/fakebz", "--reruns", "-1"], "argument --reruns: -1 is too small", None),
    (["{S}/fakebz", "{S}/fakebz", "--seed", "x"], "argument --seed: 'x' is not a whole number", None),
    (["{S}/fakebz", "{S}/fakebz", "--profile", "bogus"], "argument --profile: invalid choice: 'bogus'", None),
    (["{S}/fakebz", "{S}/fakebz", "--lock", "{S}/no/dir/lock"], "the directory {S}/no/dir does not exist", None),
    (["{S}/fakebz", "{S}/fakebz", "--out", "{S}/file.txt"], "--out {S}/file.txt is a file", None),
    (["{S}/fakebz", "{S}/fakebz"], "$EROFS_TEST_SEED: 'one' is not a whole number", {"EROFS_TEST_SEED": "one"}),
    (["{S}/fakebz", "{S}/fakebz"], "$EROFS_TEST_ACCEL: 'TCG' is not one of tcg, kvm", {"EROFS_TEST_ACCEL": "TCG"}),
    (["{S}/fakebz", "{S}/unclean"], "kernel tree {S}/unclean holds an in-tree build (.config)", None),
    (["{S}/fakebz", "{S}/fakebz", "--", "-k", "nothing_matches"], "the pytest arguments -k nothing_matches select "
     "no test (no tests collected", None),
    (["{S}/fakebz", "{S}/fakebz", "--", "tests/fscache/test_nosuch.py"], "select no test (ERROR: file or directory "
     "not found: tests/fscache/test_nosuch.py)", None),
], ids=ident)
def test_compare_kernels_refuses(scratch, args, says, env):
    shutil.copytree(scratch.root / "faketree", scratch.root / "unclean")
    (scratch.root / "unclean" / ".config").write_text("CONFIG_EROFS_FS=y\n")  # `make O=` would refuse it after A
    scratch.before = tree(scratch.root)
    refused(scratch, tool("compare-kernels") + args, says, env)


def test_compare_kernels_report_only_needs_results(scratch):
    """Runs that ended before any test (empty observables) are not "nothing changed"."""
    for side in ("A", "B"):
        (scratch.root / "cmp" / side / "run").mkdir(parents=True)
        (scratch.root / "cmp" / side / "run" / "observables.jsonl").write_text("")
    scratch.before = tree(scratch.root)
    refused(scratch, tool("compare-kernels") + ["--report-only", "{S}/cmp"], "hold no test results")


# ------------------------------------------------------------------------------------- bisect


@pytest.fixture
def gitrepo(scratch):
    """A repository of a fake kernel tree (`make` fails in it at once) with two commits."""
    repo = scratch.root / "repo"
    shutil.copytree(scratch.root / "faketree", repo)
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (repo / "fs" / "erofs" / "super.c").write_text("int s;\n")
    subprocess.run(git[:3] + ["add", "-A"], check=True)
    for n in ("one", "two"):
        subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", n], check=True)
    scratch.before = tree(scratch.root)
    return repo


ONE_TEST = "tests/fscache/test_domains.py::test_shared_domain_fetches_base_once"


@pytest.mark.parametrize("args, says", [
    (["tests/fscache/test_domains.py::test_nope"], "is not a test of the suite (ERROR: not found"),
    (["tests/fscache/test_nosuch.py::test_x"], "is not a test of the suite (ERROR: file or directory not found"),
    ([ONE_TEST], f"test id {ONE_TEST} names 3 tests"),
    ([ONE_TEST + "[2]", "--", "-k", "nothing_matches"], "is not a test of the suite (no tests collected"),
    ([ONE_TEST + "[2]", "--good", "nope"], "--good nope is not a commit of"),
    ([ONE_TEST + "[2]", "--src", "{S}/empty"], "--src {S}/empty is not a git work tree"),
    ([ONE_TEST + "[2]", "--src", "{S}/nosuch"], "--src {S}/nosuch does not exist"),
    ([ONE_TEST + "[2]", "--src", "{S}/faketree/fs"], "--src {S}/faketree/fs is not a git work tree"),
    ([ONE_TEST + "[2]", "--seed-from", "{S}/empty"], "--seed-from {S}/empty is not a Linux kernel tree"),
    ([ONE_TEST + "[2]", "--profile", "bogus"], "argument --profile: invalid choice"),
    ([ONE_TEST + "[2]", "--out", "{S}/file.txt"], "--out {S}/file.txt is a file"),
], ids=ident)
def test_bisect_refuses_before_building(scratch, gitrepo, args, says):
    """The test id is collected before the worktree and the first build (it was built first)."""
    own = args[: args.index("--")] if "--" in args else args
    rest = args[len(own):]
    argv = tool("bisect") + own[:1] + ["--good", "HEAD~1", "--bad", "HEAD", "--src", str(gitrepo)] + own[1:] + rest
    refused(scratch, argv, says)
    worktrees = subprocess.run(["git", "-C", str(gitrepo), "worktree", "list"], capture_output=True, text=True)
    assert len(worktrees.stdout.splitlines()) == 1, f"a worktree was added:\n{worktrees.stdout}"


# ------------------------------------------------------------------------------- build-kernel


@pytest.mark.parametrize("args, says, env", [
    (["--src", "{S}/nosuch", "--print-builddir"], "--src {S}/nosuch does not exist; give a Linux kernel", None),
    (["--src", "{S}/empty", "--print-builddir"], "--src {S}/empty is not a Linux kernel tree", None),
    (["--src", "{S}/file.txt"], "--src {S}/file.txt is not a directory", None),
    (["--src", "{S}/faketree", "-j", "0"], "argument -j/--jobs: 0 is too small", None),
    (["--src", "{S}/faketree", "-j", "x"], "argument -j/--jobs: 'x' is not a whole number", None),
    (["--src", "{S}/faketree", "--fragment", "{S}/nosuch.config"], "--fragment {S}/nosuch.config does not exist",
     None),
    (["--src", "{S}/faketree", "--kernel-version", "9.9"], "argument --kernel-version: invalid choice", None),
    (["--src", "{S}/faketree", "--profile", "fast"], "argument --profile: invalid choice", None),
    (["--src", "", "--print-builddir"], "argument --src: an empty path", None),
    (["--src", "{S}/faketree", "--print-builddir"], "unknown kernel version '9.9'",
     {"EROFS_TEST_KERNEL_VERSION": "9.9"}),
], ids=ident)
def test_build_kernel_refuses(scratch, args, says, env):
    o = refused(scratch, tool("build-kernel") + args, says, env)
    assert o.out == "", f"a build directory was printed for bad input: {o.out!r}"


# -------------------------------------------------------------------------- build-erofs-utils


@pytest.mark.parametrize("args, says", [
    (["--src", "{S}/nosuch"], "--src {S}/nosuch does not exist; give an erofs-utils source tree"),
    (["--src", "{S}/empty"], "--src {S}/empty is not an erofs-utils tree"),
    (["--src", "{S}/fakeutils", "--cache", "{S}/file.txt"], "--cache {S}/file.txt is a file"),
    (["--src", "{S}/fakeutils", "-j", "0"], "argument -j/--jobs: 0 is too small"),
    (["--src", "{S}/fakeutils", "--refresh"], "--refresh applies to Debian's source package"),
    (["--debian-version", "1.8 10", "--mirror", "file:///nonexistent-mirror"], "is not a Debian version"),
    (["--mirror", "deb.debian.org"], "--mirror 'deb.debian.org' is not a mirror URI"),
    (["--src", ""], "argument --src: an empty path"),  # was: Debian's erofs-utils, fetched and built
    (["--mirror", "", "--src", "{S}/fakeutils"], "argument --mirror: an empty value"),
], ids=ident)
def test_build_erofs_utils_refuses(scratch, args, says):
    refused(scratch, tool("build-erofs-utils") + args, says)


# -------------------------------------------------------------------------------------- cache


def test_cache_refuses(scratch):
    refused(scratch, tool("cache") + ["--list"], "$EROFS_TEST_CACHE {S}/file.txt is not a directory",
            {"EROFS_TEST_CACHE": "{S}/file.txt"})
    kept = scratch.cache / "kernels" / "k0"
    kept.mkdir(parents=True)
    scratch.before = tree(scratch.root)
    o = run(tool("cache") + ["--clear", "bogus"], clean_env(scratch), scratch.root)
    assert o.rc == 2 and len(o.lines()) == 1 and "unknown kind(s) bogus" in o.err, o.err
    assert kept.is_dir(), "--clear with an unknown kind removed entries"


def test_cache_list_creates_nothing(scratch):
    missing = scratch.root / "no" / "cache"
    o = run(tool("cache") + ["--list"], clean_env(scratch, {"EROFS_TEST_CACHE": str(missing)}), scratch.root)
    assert o.rc == 0 and "does not exist yet" in o.out, o.out + o.err
    scratch.unchanged()


def test_cache_list_names_every_folder_of_its_own(scratch):
    """Every folder the suite writes into its cache root has a row (two were missing)."""
    from erofs_domains.host import cachegc

    written = ["launch", "kernels", "kbuild", "images", "probes", "erofs-utils", "src", "apt", "farms", "bisect",
               "erofs-utils-trees", "results", "tox-venv"]
    for d in written + ["someone-elses"]:
        (scratch.cache / d).mkdir()
    o = run(tool("cache") + ["--list"], clean_env(scratch), scratch.root)
    rows = {line.split()[0] for line in o.out.splitlines()[3:] if line.strip() and not line.startswith("not ")}
    assert set(written) <= rows, f"--list leaves out {sorted(set(written) - rows)}:\n{o.out}"
    assert "not the suite's (listed, never removed): someone-elses" in o.out, o.out
    assert {k.subdir for k in cachegc.KINDS} == set(written)


# ------------------------------------------------------------------------------ outcome-table


@pytest.mark.parametrize("args, says", [
    (["--check", "{S}/nosuch.md"], "--check {S}/nosuch.md does not exist"),
    (["--check", "{S}/empty"], "--check {S}/empty is not a file"),
    (["--write", "{S}/readme.md"], "has no <!-- outcome-table:begin -->"),
    (["--check"], "argument --check: expected one argument"),
], ids=ident)
def test_outcome_table_refuses(scratch, args, says):
    refused(scratch, tool("outcome-table") + args, says)


def test_outcome_table_answers_from_the_system_python(scratch):
    """Run by the distribution's Python (no pytest, no tabulate): it finds tox's venv, or says
    in one line how to make one; never a traceback."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no /usr/bin/python3")
    o = run([python, str(TOOLS / "outcome-table"), "--check", str(REPO / "README.md")], clean_env(scratch), REPO)
    assert "Traceback" not in o.err, o.err
    assert o.rc == 0 or (o.rc == 2 and "tools/tox -e unit --notest" in o.err and len(o.lines()) == 1), o.err


def test_outcome_table_without_any_venv_says_how_to_get_one(scratch):
    """A checkout without tox's venvs, run by a Python without the tests' packages: one line."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    probe = subprocess.run([python or "false", "-c", "import pytest, tabulate, hypothesis"], capture_output=True)
    if python is None or probe.returncode == 0:
        pytest.skip("no system python3 without the tests' packages")
    copy = scratch.root / "checkout"
    (copy / "tools").mkdir(parents=True)
    (copy / "erofs_domains" / "host").mkdir(parents=True)
    shutil.copy2(TOOLS / "outcome-table", copy / "tools")
    (copy / "erofs_domains" / "__init__.py").write_text("")
    for name in ("__init__.py", "deps.py", "validate.py"):
        shutil.copy2(REPO / "erofs_domains" / "host" / name, copy / "erofs_domains" / "host")
    scratch.before = tree(scratch.root)
    o = refused(scratch, [python, str(copy / "tools" / "outcome-table")], "create tox's environment first "
                "(`tools/tox -e unit --notest`)", {"PYTHONDONTWRITEBYTECODE": "1"})
    assert o.rc == 2, o.err


# ---------------------------------------------------------------------------------------- tox


@pytest.fixture
def fake_apt(scratch):
    """dpkg-query says every package is missing; sudo and apt-get only record that they ran."""
    bin_dir = scratch.root / "fakebin"
    bin_dir.mkdir()
    log = scratch.root / "apt.log"
    for name in ("dpkg-query", "sudo", "apt-get"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n'
                                    + ("exit 1\n" if name == "dpkg-query" else "exit 0\n"))
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


@pytest.mark.parametrize("args, says, rc", [
    (["--help"], "Environments (tox.ini): unit vm matrix lint", 0),
    (["-h"], "tools/tox --install-only", 0),
    (["-e", "vmm"], "unknown environment 'vmm'; give one of: unit vm matrix lint", 2),
    (["-elint,bogus", "--", "-x"], "unknown environment 'bogus'", 2),
    (["--envlist=uni"], "unknown environment 'uni'", 2),
])
def test_tox_answers_without_apt(scratch, fake_apt, args, says, rc):
    bin_dir, log = fake_apt
    scratch.before = tree(scratch.root)
    env = clean_env(scratch, {"PATH": f"{bin_dir}:/usr/bin:/bin", "EROFS_TEST_VENV": str(scratch.root / "venv")})
    o = run(tool("tox") + args, env, scratch.root)
    assert o.rc == rc, o.out + o.err
    assert says in o.out + o.err, o.out + o.err
    if rc:
        assert len(o.lines()) == 1, o.err
    assert not log.exists() or "apt-get" not in log.read_text(), f"apt ran:\n{log.read_text()}"
    assert not (scratch.root / "venv").exists(), "the tox venv was made"
    scratch.before.update({k: v for k, v in tree(scratch.root).items() if k == "apt.log"})  # dpkg-query's log
    scratch.unchanged()


# ------------------------------------------------------------------------------ erofs-utils-check


@pytest.mark.parametrize("args, says", [
    (["--tree"], "--tree needs a value: an erofs-utils source tree"),
    (["--tree", ""], "--tree needs a value"),
    (["--tree", "{S}/nosuch"], "--tree {S}/nosuch is not a directory"),
    (["--tree", "{S}/empty"], "{S}/empty is not an erofs-utils tree"),
    (["--tree", "{S}/fakeutils", "--mkfs"], "--mkfs needs a value"),
    (["--tree", "{S}/fakeutils", "--mkfs", "{S}/nosuch"], "--mkfs {S}/nosuch is not an executable file"),
    (["--tree", "{S}/fakeutils", "--mkfs", "{S}/file.txt"], "--mkfs {S}/file.txt is not an executable file"),
    (["--tree", "{S}/fakeutils", "--no-build", "--results", "{S}/file.txt"], "--results {S}/file.txt is a file"),
    ([], "is not an erofs-utils tree"),  # the suite on its own, not plugged into a tree
], ids=ident)
def test_erofs_utils_check_refuses(scratch, args, says):
    refused(scratch, tool("erofs-utils-check") + args, says)


# -------------------------------------------------------------------------- plug-into-erofs-utils


@pytest.mark.parametrize("args, says", [
    ([], "the following arguments are required: tree"),
    (["{S}/nosuch"], "{S}/nosuch does not exist; give an erofs-utils source tree"),
    (["{S}/empty"], "{S}/empty is not an erofs-utils tree"),
    (["{S}/fakeutils", "--dir", "../up"], "--dir '../up': want a new directory name under tests/"),
    (["{S}/fakeutils", "--dir", "fscache"], "--dir 'fscache'"),
], ids=ident)
def test_plug_into_erofs_utils_refuses(scratch, args, says):
    refused(scratch, tool("plug-into-erofs-utils") + args, says)


# ----------------------------------------------------------------------------- ondemand-daemon


@pytest.mark.parametrize("args, says", [
    ([], "the following arguments are required: --cache"),
    (["--cache", "{S}/nosuch"], "ERROR 2 --cache {S}/nosuch is not a directory"),
    (["--cache", "{S}/file.txt"], "ERROR 20 --cache {S}/file.txt is not a directory"),
    (["--cache", "{S}/empty", "--threads", "0"], "ERROR 22 threads must be >= 1"),
    (["--cache", "{S}/empty", "--fill-granularity", "abc"], "argument --fill-granularity: not a size: 'abc'"),
    (["--cache", "{S}/empty", "--blob", "x"], "expected NAME=VALUE"),
    (["--cache", "{S}/empty", "--blob", "x={S}/nosuch"], "ERROR 22 blob 'x'"),
], ids=ident)
def test_ondemand_daemon_refuses(scratch, args, says):
    refused(scratch, tool("ondemand-daemon") + args, says)


# -------------------------------------------------------------------------- vm-run, vm-python


@pytest.mark.parametrize("args, says, env", [
    (["--kernel", "{S}/notbz", "--", "true"], "--kernel {S}/notbz is not a bzImage: no x86 boot header", None),
    (["--kernel", "{S}/short", "--", "true"], "shorter than the x86 boot header", None),
    (["--kernel", "", "--", "true"], "argument --kernel: an empty path", None),
    (["--kernel", "{S}/nosuch", "--", "true"], "--kernel {S}/nosuch does not exist", None),
    (["--kernel", "{S}/empty", "--", "true"], "--kernel {S}/empty is a directory", None),
    (["--", "true"], "$EROFS_TEST_KERNEL {S}/notbz is not a bzImage", {"EROFS_TEST_KERNEL": "{S}/notbz"}),
    (["--kernel", "{S}/fakebz", "--kernel-version", "6.1", "--", "true"], "--kernel and --kernel-version: give one",
     None),
    (["--kernel", "{S}/fakebz", "--kernel-src", "{S}/faketree", "--", "true"], "--kernel and --kernel-src", None),
    (["--kernel-src", "{S}/empty", "--", "true"], "--kernel-src {S}/empty is not a Linux kernel tree", None),
    (["--kernel", "{S}/fakebz", "--console-log", "{S}/no/x.log", "--", "true"], "the directory {S}/no does not",
     None),
    (["--kernel", "{S}/fakebz"], "give a command after --, or --shell", None),
    (["--kernel", "{S}/fakebz", "--", "true"], "$EROFS_TEST_VM_LIFETIME='4h' is not a number",
     {"EROFS_TEST_VM_LIFETIME": "4h"}),
], ids=ident)
def test_vm_run_refuses(scratch, args, says, env):
    refused(scratch, tool("vm-run") + args, says, env)


@pytest.mark.parametrize("env, says", [
    ({"EROFS_TEST_KERNEL": "{S}/notbz"}, "$EROFS_TEST_KERNEL {S}/notbz is not a bzImage"),
    ({"EROFS_TEST_KERNEL": "{S}/nosuch"}, "$EROFS_TEST_KERNEL {S}/nosuch does not exist"),
    ({}, "EROFS_TEST_KERNEL is not set"),
], ids=["not-a-bzimage", "missing", "unset"])
def test_vm_python_refuses(scratch, env, says):
    refused(scratch, tool("vm-python") + ["-c", "pass"], says, env)


# ------------------------------------------------------------------------------------ benches

# MKFS_EROFS names a file: without it the benches would resolve (build) Debian's erofs-utils first.
BENCH_ENV = {"MKFS_EROFS": "{S}/file.txt"}


@pytest.mark.parametrize("args, says", [
    (["--kernel", "{S}/notbz"], "--kernel {S}/notbz is not a bzImage"),
    (["--size-mib", "0"], "argument --size-mib: 0 is too small"),
    (["--prefetch", "-1"], "argument --prefetch: -1 is too small"),
    (["--fill-granularity", "1000"], "'1000' is not a positive multiple of 4096"),
], ids=ident)
def test_bench_cold_read_refuses(scratch, args, says):
    refused(scratch, tool("bench-cold-read") + args, says, BENCH_ENV)


@pytest.mark.parametrize("args, says", [
    (["--kernel", "{S}/notbz"], "--kernel {S}/notbz is not a bzImage"),
    (["--profile", "bogus"], "--profile 'bogus': bad netem item 'bogus'"),
    (["--granularity", "64K,abc"], "'abc' is not a positive multiple of 4096"),
    (["--image-profile", "huge"], "--image-profile 'huge' is not a content profile"),
    (["--repeat", "0"], "argument --repeat: 0 is too small"),
    (["--json", "{S}/no/out.json"], "--json {S}/no/out.json: the directory {S}/no does not exist"),
], ids=ident)
def test_bench_lazy_pull_refuses(scratch, args, says):
    refused(scratch, tool("bench-lazy-pull") + args, says, BENCH_ENV)


# ---------------------------------------------------------------------------- pytest options

PYTEST = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), f"--rootdir={REPO}",
          "-p", "no:cacheprovider"]
VM = ["--dist", "load", "--tx", "1*popen//python=tools/vm-python"]
FSCACHE = "tests/fscache/test_domains.py"


@pytest.mark.parametrize("args, says, env", [
    (VM + ["--kernel", "{S}/notbz", FSCACHE], "ERROR: --kernel {S}/notbz is not a bzImage: no x86 boot header",
     None),
    (VM + [FSCACHE], "ERROR: $EROFS_TEST_KERNEL {S}/nosuch does not exist", {"EROFS_TEST_KERNEL": "{S}/nosuch"}),
    (VM + ["--kernel-src", "{S}/empty", FSCACHE], "ERROR: --kernel-src {S}/empty is not a Linux kernel tree", None),
    # --kernel-src on the command line beats $EROFS_TEST_KERNEL (which used to win without a word)
    (VM + ["--kernel-src", "{S}/empty", FSCACHE], "ERROR: --kernel-src {S}/empty is not a Linux kernel tree",
     {"EROFS_TEST_KERNEL": "{S}/fakebz"}),
    (VM + ["--kernel", "{S}/fakebz", "--kernel-src", "{S}/faketree", FSCACHE], "give one", None),
    (VM + ["--kernel", "{S}/fakebz", "--kernel-version", "6.1", FSCACHE], "give one", None),
    (VM + [FSCACHE], "$EROFS_TEST_KERNEL_VERSION 9.9 is not a series", {"EROFS_TEST_KERNEL_VERSION": "9.9"}),
    (VM + ["--kernel", "{S}/fakebz", "--results", "{S}/file.txt", FSCACHE], "--results {S}/file.txt is a file", None),
    (VM + ["--kernel", "{S}/fakebz", "--mkfs", "{S}/file.txt", FSCACHE], "--mkfs {S}/file.txt is not executable",
     None),
    (VM + ["--kernel", "{S}/fakebz", "--erofs-utils-src", "{S}/empty", FSCACHE], "is not an erofs-utils tree", None),
    (["--kernel", "{S}/fakebz", FSCACHE], "is used by VM runs only and this run boots no kernel", None),
    (["--kernel-version", "6.1", "tests/unit/test_kmsg.py"], "--kernel-version 6.1 is used by VM runs only", None),
    (["--host-mode", "--kernel", "{S}/fakebz", FSCACHE], "has no effect with --host-mode", None),
    (VM + ["--kernel", "{S}/fakebz", FSCACHE], "$EROFS_TEST_SEED: -1 is too small", {"EROFS_TEST_SEED": "-1"}),
], ids=ident)
def test_pytest_options_refused_before_anything(scratch, args, says, env):
    """conftest.py would prune the cache, resolve erofs-utils, build images and boot before qemu
    said "invalid kernel header"; the options are checked first."""
    refused(scratch, PYTEST + scratch.sub(args), says, {"MKFS_EROFS": "{S}/file.txt", **(env or {})}, cwd=REPO)


def test_pytest_bad_timeout_is_a_usage_error(scratch):
    """From the environment: one line (it was a traceback). On the command line: pytest's own
    usage error (its usage lines, then the one that says what is wrong)."""
    refused(scratch, PYTEST + ["tests/unit/test_kmsg.py"], "ERROR: $EROFS_TEST_TIMEOUT='abc' is not a number",
            {"EROFS_TEST_TIMEOUT": "abc"}, cwd=REPO)
    refused(scratch, PYTEST + ["--test-timeout", "0", "tests/unit/test_kmsg.py"], "argument --test-timeout: 0 is "
            "not > 0; want seconds > 0", one_line=False, cwd=REPO)


@pytest.mark.parametrize("paths, named, not_named", [
    ([FSCACHE], "`tox -e vm -- tests/fscache`", "tests/pagecache"),
    (["tests/pagecache"], "`tox -e vm -- tests/pagecache`", "tests/fscache"),
])
def test_plain_pytest_hint_names_the_suite_that_was_asked(scratch, paths, named, not_named):
    o = run(PYTEST + ["-q", *paths], clean_env(scratch), REPO)
    assert o.rc == 4, o.out + o.err
    hint = next(line for line in o.out.splitlines() if "need" in line)
    assert named in hint and not_named not in hint, hint
    scratch.unchanged()
