"""The suite inside erofs-utils, on clones of the upstream bundle (master, which has no test
harness, and experimental-tests-fscache, which has the xfstests-style one):
tools/plug-into-erofs-utils, the tree built as erofs-utils builds itself, its make check case
(SKIP on a kernel without erofs/cachefiles on-demand), and the image cache against an edited
mkfs (same version string, different output) and a wrapper mkfs.

The bundle is $EROFS_TEST_UPSTREAM_BUNDLE, else ../shared/upstream/erofs-utils.bundle next to
this repository; without it these tests skip
(fail under CI).  Built trees are kept in <cache>/erofs-utils-trees/<branch> and reused: the
first run builds two trees (about a minute each on 2 cores), later runs take seconds.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from erofs_domains.base import erofs_tools
from erofs_domains.base.cache_dir import cache_root
from erofs_domains.guest import kernel_features as kernel
from erofs_domains.guest.images import ImageFactory
from erofs_domains.host import erofs_utils_build as erofs_utils
from erofs_domains.host import variants

REPO = Path(__file__).resolve().parents[2]

PLUG = REPO / "tools" / "plug-into-erofs-utils"
SUITE_DIR = "shared-domain"
HARNESS_BRANCH = "experimental-tests-fscache"


def _bundle() -> Path | None:
    for cand in (os.environ.get("EROFS_TEST_UPSTREAM_BUNDLE"), REPO.parent / "shared/upstream/erofs-utils.bundle"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="module")
def bundle() -> Path:
    found = _bundle()
    if found is None:
        msg = ("no erofs-utils bundle (set EROFS_TEST_UPSTREAM_BUNDLE, or put it at "
               "../shared/upstream/erofs-utils.bundle)")
        if os.environ.get("CI"):
            pytest.fail(f"CI: {msg}", pytrace=False)
        pytest.skip(msg)
    return found


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True, text=True).stdout


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


def built_tree(bundle: Path, branch: str) -> Path:
    """A clone of `branch`, reset to the bundle's commit and unplugged, built in place as
    erofs-utils builds itself.  Kept between runs: make then rebuilds nothing."""
    tree = cache_root() / "erofs-utils-trees" / branch
    with variants.locked(tree.with_name(f".{branch}.lock")):
        if not (tree / ".git").is_dir():
            shutil.rmtree(tree, ignore_errors=True)
            subprocess.run(["git", "clone", "-q", "--branch", branch, str(bundle), str(tree)], check=True)
        git(tree, "fetch", "-q", str(bundle), branch)
        git(tree, "checkout", "-q", "-f", "FETCH_HEAD")
        for junk in (f"tests/{SUITE_DIR}", "tests/results", ".github/workflows/fscache.yml"):
            p = tree / junk
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if not (tree / "Makefile").is_file():
            r = run(["sh", "-c", "./autogen.sh && ./configure"], tree)
            assert r.returncode == 0, f"{branch}: autogen/configure failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
        r = run(["make", f"-j{os.cpu_count() or 1}"], tree)
        assert r.returncode == 0, f"{branch}: make failed:\n{r.stderr[-3000:]}"
    return tree


def plug(tree: Path, *extra: str) -> str:
    r = run([sys.executable, str(PLUG), *extra, str(tree)], REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def master(bundle) -> Path:
    return built_tree(bundle, "master")


@pytest.fixture(scope="module")
def harness_tree(bundle) -> Path:
    return built_tree(bundle, HARNESS_BRANCH)


def host_can_run_suite() -> str | None:
    """None when this machine could run the host-mode suite (then its make check case would
    run the whole suite here; these tests do not do that)."""
    if os.geteuid() != 0:
        return "not root"
    return kernel.detect().why_no_ondemand()


# ------------------------------------------------------------------------- plug-in


def test_plug_into_master_copies_the_suite_into_its_own_directory(master):
    out = plug(master)
    dest = master / "tests" / SUITE_DIR
    suite = set(git(REPO, "ls-files").split("\n")) - {""}
    for rel in ("tests/unit/test_outcome_table.py", "tests/host/test_kernel_bug.py", "tests/__init__.py",
                ".gitignore", ".ci/run", "README.md", "make-check/001", "tools/erofs-utils-check"):
        assert rel in suite and (dest / rel).is_file(), f"{rel} missing from the plugged copy"
    missing = sorted(f for f in suite if not f.startswith(".github/") and not (dest / f).exists())
    assert missing == [], f"suite files not copied: {missing}"
    assert (master / ".github/workflows/fscache.yml").is_file()
    assert "no make check harness" in out
    # nothing in erofs-utils' build files changes on master
    assert git(master, "status", "--porcelain", "--untracked-files=no").split() == ["M", ".gitignore"]
    # the ignore rules: the suite's dot-files are visible to git, what a run writes is not
    (dest / "results").mkdir(exist_ok=True)
    (dest / "results" / "x").write_text("x")
    (dest / "__pycache__").mkdir(exist_ok=True)
    (master / "tests" / "results").mkdir(exist_ok=True)
    (master / "tests" / "results" / "y").write_text("y")
    untracked = git(master, "status", "--porcelain", "--untracked-files=all").splitlines()
    names = {line[3:] for line in untracked if line.startswith("??")}
    for rel in (f"tests/{SUITE_DIR}/.gitignore", f"tests/{SUITE_DIR}/.ci/run", ".github/workflows/fscache.yml"):
        assert rel in names, f"{rel} hidden from git (erofs-utils' .gitignore has `.*`)"
    assert not [n for n in names if "/results/" in n or "__pycache__" in n], names
    # the suite's README-bound checks hold inside the tree (README.md is the suite's, not erofs-utils')
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_outcome_table.py"],
            dest, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    # plugging again changes nothing in the wiring (the copy is replaced)
    before = (master / ".gitignore").read_text()
    plug(master)
    assert (master / ".gitignore").read_text() == before


def test_erofs_utils_build_key_ignores_what_a_run_writes(master):
    plug(master)
    key, _, files = erofs_utils.source_key(master)
    assert not [f for f in files if f.startswith(f"tests/{SUITE_DIR}/")], "the suite's copy is not erofs-utils"
    (master / "tests" / "results").mkdir(exist_ok=True)
    (master / "tests" / "results" / "z.full").write_text("run output")
    (master / "lib" / "__pycache__").mkdir(exist_ok=True)
    (master / "lib" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert erofs_utils.source_key(master)[0] == key, "run junk changed the build key (a full rebuild)"
    shutil.rmtree(master / "lib" / "__pycache__")
    main_c = master / "mkfs" / "main.c"
    text = main_c.read_text()
    try:
        main_c.write_text(text + "\n/* edited */\n")
        assert erofs_utils.source_key(master)[0] != key, "an edited source file must give a new build"
    finally:
        main_c.write_text(text)


def test_master_documented_command_builds_and_skips_here(master):
    """tests/shared-domain/tools/erofs-utils-check from the tree's root: builds the tree (make,
    nothing to do here), then host mode, which exits 77 naming why it cannot run here."""
    if host_can_run_suite() is None:
        pytest.skip("this machine could run the host-mode suite; not run from the unit tests")
    plug(master)
    r = run([f"tests/{SUITE_DIR}/tools/erofs-utils-check"], master, env={**os.environ, "PYTHON": sys.executable},
            timeout=600)
    assert r.returncode == 77, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "building" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == host_can_run_suite() or "cannot run the suite" in r.stdout


def test_harness_branch_make_check_lists_the_case_as_skip(harness_tree):
    if host_can_run_suite() is None:
        pytest.skip("this machine could run the host-mode suite; not run from the unit tests")
    out = plug(harness_tree)
    assert "make check-fscache-vm" in out
    am = (harness_tree / "tests" / "Makefile.am").read_text()
    case = f"{SUITE_DIR}/make-check/001"
    assert case in am and am.index(case) < am.rindex("EXTRA_DIST"), "the case goes before EXTRA_DIST"
    extra = [line for line in am.splitlines() if line.startswith("EXTRA_DIST")]
    assert extra and not [x for x in extra if SUITE_DIR in x], "the suite must not be shipped"
    r = run(["make", f"-j{os.cpu_count() or 1}"], harness_tree)  # automake picks up Makefile.am
    assert r.returncode == 0, r.stderr[-3000:]
    tests = run(["make", "-s", "-C", "tests", "-f", "Makefile", "-f", "/dev/stdin", "print-tests"], harness_tree,
                input="print-tests:\n\t@echo $(TESTS)\n")
    listed = tests.stdout.split()
    assert f"./{case}" in listed and "fscache/001" in listed, tests.stdout + tests.stderr
    r = run(["make", "-C", "tests", "check", f"TESTS=./{case}"], harness_tree,
            env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"SKIP: ./{case}" in out, out[-3000:]
    notrun = harness_tree / "tests" / "results" / SUITE_DIR / "001.notrun"
    assert notrun.is_file(), f"no {notrun}: results go under tests/results/"
    assert host_can_run_suite() in notrun.read_text() or "cannot run" in notrun.read_text()


# ------------------------------------------------------------------------- the mkfs under test


def test_edited_mkfs_with_the_same_version_gives_new_images(master, tmp_path, monkeypatch):
    """A tree rebuilt with a change in mkfs (the superblock checksum feature dropped) reports
    the same version string; its images must not come from the unedited build's cache."""
    orig = master / "mkfs" / "mkfs.erofs"
    version = erofs_tools.version(orig)
    edited_src = tmp_path / "edited"
    subprocess.run(["git", "clone", "-q", str(master), str(edited_src)], check=True)
    main_c = edited_src / "mkfs" / "main.c"
    text = main_c.read_text()
    assert "g_sbi.feature_compat = EROFS_FEATURE_COMPAT_SB_CHKSUM |" in text
    main_c.write_text(text.replace("g_sbi.feature_compat = EROFS_FEATURE_COMPAT_SB_CHKSUM |",
                                   "g_sbi.feature_compat ="))
    monkeypatch.setenv("EROFS_UTILS_VERSION", version)  # as a distribution build sets it
    edited = erofs_utils.build_from_tree(edited_src, log=lambda _: None)
    assert edited.version == version, "the edited build must report the same version string"
    cache = tmp_path / "images"
    a = ImageFactory(cache, orig, seed=1, profile="tiny")
    img_a = a.single("img")
    b = ImageFactory(cache, edited.mkfs, seed=1, profile="tiny")
    img_b = b.single("img")
    assert (a.builds, b.builds, b.hits) == (1, 1, 0), "the edited mkfs got the cached image of the unedited one"
    assert img_a.path != img_b.path
    assert img_a.path.read_bytes() != img_b.path.read_bytes()
    again = ImageFactory(cache, orig, seed=1, profile="tiny")
    assert again.single("img").path == img_a.path and (again.builds, again.hits) == (0, 1), \
        "an unchanged mkfs must reuse its images"


def _wrapper(tmp_path: Path, real: Path, extra: str = "") -> tuple[Path, Path]:
    log = tmp_path / "calls.log"
    w = tmp_path / "wrap" / "mkfs.erofs"
    w.parent.mkdir(parents=True)
    w.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} {extra}"$@"\n')
    w.chmod(0o755)
    return w, log


def test_wrapper_mkfs_is_called_by_every_image_build(master, tmp_path):
    real = master / "mkfs" / "mkfs.erofs"
    w, log = _wrapper(tmp_path, real)
    f = ImageFactory(tmp_path / "images", w, seed=7, profile="tiny")
    built = [f.single("s"), f.single("n", inline_data=False), f.blobdev("b", "blob-b"), f.compressed("c"),
             f.layered("base", "app")]
    calls = [c for c in log.read_text().splitlines() if "--version" not in c]
    assert f.hits == 0 and len(calls) == f.builds == 7, (f.builds, f.hits, calls)  # 4 + layers base, app + merge
    assert all(img.path.is_file() for img in built)
    # the wrapper adds an option: a different mkfs, so new images (not the cache of the first)
    w2, log2 = _wrapper(tmp_path / "2", real, "-Eforce-inode-extended ")
    g = ImageFactory(tmp_path / "images", w2, seed=7, profile="tiny")
    g.single("s")
    assert (g.builds, g.hits) == (1, 0)


def test_mkfs_given_is_used_as_it_is_and_nothing_is_downloaded(master, tmp_path, monkeypatch):
    """--mkfs/MKFS_EROFS: no build, no apt; dump/fsck from the same build (erofs-utils layout)."""
    def refuse(*a, **k):
        raise AssertionError("erofs-utils was built or downloaded although a mkfs was given")

    monkeypatch.setattr(erofs_utils, "build_from_debian", refuse)
    monkeypatch.setattr(erofs_utils, "build_from_tree", refuse)
    monkeypatch.delenv("DUMP_EROFS", raising=False)
    monkeypatch.delenv("FSCK_EROFS", raising=False)
    monkeypatch.setenv("MKFS_EROFS", str(master / "mkfs" / "mkfs.erofs"))
    u = erofs_utils.resolve()
    assert (u.mkfs, u.dump, u.fsck) == tuple(str(master / k / f"{k}.erofs") for k in ("mkfs", "dump", "fsck"))
    monkeypatch.delenv("MKFS_EROFS")
    w, _ = _wrapper(tmp_path, master / "mkfs" / "mkfs.erofs")
    assert erofs_utils.resolve(mkfs=w).mkfs == str(w)
    # DUMP_EROFS/FSCK_EROFS belong to $MKFS_EROFS: a mkfs named by --mkfs gets the tools beside it
    monkeypatch.setenv("MKFS_EROFS", "/usr/sbin/mkfs.erofs")
    monkeypatch.setenv("DUMP_EROFS", "/usr/sbin/dump.erofs")
    u = erofs_utils.resolve(mkfs=master / "mkfs" / "mkfs.erofs")
    assert u.dump == str(master / "dump" / "dump.erofs"), u


def test_pytest_mkfs_option_reaches_the_unit_tests(master, tmp_path):
    """`pytest tests/unit --mkfs W`: the image tests build through W; no erofs-utils build or
    apt list appears in a fresh cache."""
    w, log = _wrapper(tmp_path, master / "mkfs" / "mkfs.erofs")
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("MKFS_EROFS", "DUMP_EROFS", "FSCK_EROFS")}
    env["EROFS_TEST_CACHE"] = str(cache)
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--mkfs", str(w),
             f"--basetemp={tmp_path / 'bt'}", "tests/unit/test_images.py",
             "-k", "test_single_images or test_blobdev_image"], REPO, env=env, timeout=600)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:]
    calls = [c for c in log.read_text().splitlines() if "--version" not in c]
    images = [d.name for d in (tmp_path / "bt" / "image-cache0").iterdir() if not d.name.startswith(".")]
    assert len(calls) == len(images) >= 9, (images, calls)  # every image built by the wrapper, once
    assert not (cache / "erofs-utils").exists() and not (cache / "apt").exists(), sorted(os.listdir(cache))


def test_tool_too_old_skips_naming_the_version(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    for name in ("mkfs.erofs", "dump.erofs"):
        p = d / name
        p.write_text(f"#!/bin/sh\necho '{name} (erofs-utils) 1.8.4'\n")
        p.chmod(0o755)
    tools = erofs_tools.Tools.beside(d / "mkfs.erofs")
    reason = tools.why_not("dump --cat")
    assert reason and "1.8.5 or newer" in reason and "1.8.4" in reason, reason
    (d / "dump.erofs").write_text("#!/bin/sh\necho 'dump.erofs (erofs-utils) 1.8.5-119-g2ca608f'\n")
    assert tools.why_not("dump --cat") is None


def test_tox_unit_env_does_not_build_erofs_utils():
    """With MKFS_EROFS set, `tox -e unit` must not fetch Debian's erofs-utils first."""
    section = (REPO / "tox.ini").read_text().split("[testenv:unit]", 1)[1].split("\n[", 1)[0]
    assert not [line for line in section.splitlines() if "build-erofs-utils" in line and not line.startswith("#")]


@pytest.mark.parametrize("version, supported", [("1.7.1", False), ("1.8.5", True), ("1.8.10", True),
                                                ("1.9", False), ("1.9-5-g1234abcd", False), ("1.9.1", True),
                                                ("1.9.3", True),
                                                ("1.9.4", True), ("local-build", True)])
def test_supported_releases(tmp_path, version, supported):
    mkfs = tmp_path / "mkfs.erofs"
    mkfs.write_text(f"#!/bin/sh\necho 'mkfs.erofs (erofs-utils) {version}'\n")
    mkfs.chmod(0o755)
    reason = erofs_tools.Tools.beside(mkfs).why_unsupported()
    assert (reason is None) == supported, reason
    if version.startswith("1.9") and not supported:
        assert "1.9.1" in reason, reason


def test_workflow_builds_the_tree_and_tests_that_build():
    """.github/workflows/fscache.yml: erofs-utils' own build (a failure fails the job), then the
    VM suite on that build; triggers a mirror allows (push to branches, manual dispatch)."""
    wf = (REPO / ".github" / "workflows" / "fscache.yml").read_text()
    steps = [line.strip() for line in wf.splitlines() if line.strip().startswith("run:")]
    assert "run: ./autogen.sh && ./configure && make -j\"$(nproc)\"" in steps, steps
    assert "run: $SUITE/tools/erofs-utils-check --vm --no-build" in steps, steps
    assert "|| true" not in wf and "pull_request" not in wf
    assert "workflow_dispatch:" in wf and "branches: [dev, master, experimental-tests" in wf
