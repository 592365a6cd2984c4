"""tools/build-kernel: fragment handling, tree checks, exit codes (no real kernel build)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from erofs_domains.base.proc import cmd
from erofs_domains.host import deps
from erofs_domains.host import kernel_build as kernel

REPO = Path(__file__).resolve().parents[2]


def fragment_lines(name="ondemand.config"):
    return [line for line in (kernel.KCONFIG_DIR / name).read_text().splitlines()
            if line.startswith("CONFIG_")]


@pytest.mark.parametrize("name", ["ondemand.config", "pagecache.config", "debug.config"])
def test_every_fragment_option_says_why(name):
    undocumented = [line for line in fragment_lines(name) if not re.search(r"=\S+\s+#\s*\S", line)]
    assert not undocumented, f"options without a one-line reason in {name}: {undocumented}"


def test_fragment_holds_what_the_suite_needs():
    opts = kernel.load_fragments("default", [], kernel.KERNELS["6.12"], (6, 12, 117))
    needed = set(kernel.REQUIRED_OPTIONS["fscache"]) | {
        "CONFIG_ACPI", "CONFIG_EROFS_FS_ZIP", "CONFIG_EROFS_FS_BACKED_BY_FILE", "CONFIG_NET_9P_VIRTIO",
        "CONFIG_9P_FS", "CONFIG_VIRTIO_PCI", "CONFIG_NAMESPACES", "CONFIG_NET_NS", "CONFIG_VETH",
        "CONFIG_NET_SCHED", "CONFIG_NET_SCH_NETEM", "CONFIG_DETECT_HUNG_TASK", "CONFIG_DEBUG_LIST",
        "CONFIG_UNIX",
    }
    assert {o for o in needed if opts.get(o) != "y"} == set()


@pytest.mark.parametrize("series", sorted(kernel.KERNELS))
def test_each_series_fragments_hold_its_backends_options(series):
    k = kernel.KERNELS[series]
    opts = kernel.load_fragments("default", [], k, kernel.version_tuple(series))
    assert {o for o in kernel.REQUIRED_OPTIONS[k.backend] if opts.get(o) != "y"} == set()


def test_version_range_lines_are_left_out_outside_their_range():
    text = ("CONFIG_A=y  # always\nCONFIG_B=y  # kernel>=6.12: file-backed mounts\n"
            "CONFIG_C=y  # kernel>=7.0,<7.2: only there\n")
    assert kernel.parse_fragment(text, (6, 1, 192)) == {"CONFIG_A": "y"}
    assert kernel.parse_fragment(text, (6, 12, 117)) == {"CONFIG_A": "y", "CONFIG_B": "y"}
    assert kernel.parse_fragment(text, (7, 1, 3)) == {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "y"}
    assert kernel.parse_fragment(text, (7, 2, 13)) == {"CONFIG_A": "y", "CONFIG_B": "y"}
    assert kernel.parse_fragment(text) == {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "y"}


def test_6_1_build_leaves_out_file_backed_mounts_and_says_so():
    said = []
    opts = kernel.load_fragments("default", [], kernel.KERNELS["6.1"], (6, 1, 192), log=said.append)
    assert "CONFIG_EROFS_FS_BACKED_BY_FILE" not in opts and opts["CONFIG_EROFS_FS_ONDEMAND"] == "y"
    assert any("CONFIG_EROFS_FS_BACKED_BY_FILE left out" in x and "6.1.192" in x for x in said), said


def test_6_12_options_are_unchanged_by_the_ranges():
    """The range markers must not change 6.12's build key (its cache stays valid)."""
    opts = kernel.load_fragments("default", [], kernel.KERNELS["6.12"], (6, 12, 117))
    plain = kernel.parse_fragment((kernel.KCONFIG_DIR / "ondemand.config").read_text())
    assert kernel.render_fragment(opts) == kernel.render_fragment(plain)


def test_tree_version_and_series(tmp_path):
    (tmp_path / "Makefile").write_text("# SPDX\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\n")
    assert kernel.tree_version(tmp_path) == (6, 1, 192)
    assert kernel.series_of_tree((6, 6, 30)).series == "6.1"
    assert kernel.series_of_tree((6, 12, 117)).series == "6.12"
    assert kernel.series_of_tree((7, 2, 13)).series == "7.2"
    assert kernel.choose_series(None, tmp_path).series == "6.1"
    assert kernel.choose_series("7.2", tmp_path).series == "7.2"
    with pytest.raises(deps.ToolError, match="choose from"):
        kernel.kernel_series("5.15")


def test_render_strips_comments_and_keeps_not_set():
    opts = kernel.parse_fragment("CONFIG_A=y   # why\n# CONFIG_B is not set\n\n# a comment\nCONFIG_C=\"x\"\n")
    assert opts == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"'}
    assert kernel.render_fragment(opts) == 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x"\n'


def test_dropped_options_are_named():
    wanted = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n"}
    got = {"CONFIG_A": "y", "CONFIG_C": "n"}
    assert kernel.dropped_options(wanted, got) == ["CONFIG_B=y (got unset)"]


def test_build_key_depends_on_tree_and_fragment(tmp_path):
    a = kernel.KernelBuild(src=tmp_path / "a", options={"CONFIG_A": "y"})
    assert a.key == kernel.KernelBuild(src=tmp_path / "a", options={"CONFIG_A": "y"}).key
    assert a.key != kernel.KernelBuild(src=tmp_path / "b", options={"CONFIG_A": "y"}).key
    assert a.key != kernel.KernelBuild(src=tmp_path / "a", options={"CONFIG_A": "n"}).key


def fake_tree(tmp_path, bzimage_recipe):
    src = tmp_path / "linux"
    (src / "fs" / "erofs").mkdir(parents=True)
    (src / "Kconfig").write_text("")
    (src / "Makefile").write_text(
        "allnoconfig:\n\tcp $(KCONFIG_ALLCONFIG) $(O)/.config\n"
        f"bzImage:\n\t{bzimage_recipe}\n"
    )
    return src


def run_tool(tmp_path, src, *extra):
    env = dict(os.environ, EROFS_TEST_CACHE=str(tmp_path / "cache"))
    return cmd([sys.executable, REPO / "tools" / "build-kernel", "--src", src, *extra], check=False, env=env)


def test_tree_that_does_not_build_exits_125(tmp_path):
    """`git bisect run` skips a revision when the script exits 125."""
    src = fake_tree(tmp_path, '@echo "fs/erofs/fscache.c:1:1: error: boom"; exit 2')
    r = run_tool(tmp_path, src)
    assert r.returncode == 125, r.stderr
    assert "does not build" in r.stderr and "fs/erofs/fscache.c:1:1: error: boom" in r.stderr


def test_in_tree_build_is_refused_with_advice(tmp_path):
    src = fake_tree(tmp_path, "true")
    (src / ".config").write_text("CONFIG_A=y\n")
    r = run_tool(tmp_path, src)
    assert r.returncode == 2
    assert "in-tree build" in r.stderr and "mrproper" in r.stderr and "worktree" in r.stderr


def test_dropped_option_fails_the_configure_step(tmp_path):
    src = fake_tree(tmp_path, "true")
    # A Makefile whose allnoconfig drops CONFIG_VETH, as kconfig does when NET_CORE is off.
    (src / "Makefile").write_text("allnoconfig:\n\tgrep -v CONFIG_VETH $(KCONFIG_ALLCONFIG) > $(O)/.config\n")
    r = run_tool(tmp_path, src)
    assert r.returncode == 2
    assert "CONFIG_VETH=y (got unset)" in r.stderr, r.stderr


def test_missing_build_dependency_names_the_package(monkeypatch):
    monkeypatch.setattr(deps, "KERNEL_BUILD", (deps.Dep("no-such-tool-xyz", "pkg-xyz"),))
    with pytest.raises(deps.MissingDependency) as e:
        deps.check(deps.KERNEL_BUILD, "build the kernel")
    assert "apt-get install pkg-xyz" in str(e.value)


def test_ikconfig_from_a_built_image():
    images = sorted(kernel.cache_root().glob("kernels/*/bzImage"))
    if not images:
        pytest.skip("no kernel built yet (tools/build-kernel)")
    cfg = kernel.ikconfig_from_bzimage(images[-1])
    assert cfg is not None and cfg.get("CONFIG_IKCONFIG") == "y"
    release = kernel.bzimage_release(images[-1])
    assert release and re.match(r"\d+\.\d+", release), release


def test_every_list_of_series_is_the_one_table():
    """KERNELS (erofs_domains/host/kernel_build.py) defines the series; .ci/run asks
    tools/build-kernel --list-series for the per-push ones, and tox's matrix env and the
    workflow's job matrix name every series of it, in its order."""
    series = list(kernel.KERNELS)

    def listed(*flags):
        return subprocess.run([str(REPO / "tools" / "build-kernel"), "--list-series", *flags], capture_output=True,
                              text=True, check=True, timeout=60).stdout.split()

    assert listed("--all") == series
    assert listed() == [s for s in series if kernel.KERNELS[s].per_push] == list(kernel.PER_PUSH)
    assert "tools/build-kernel --list-series" in (REPO / ".ci" / "run").read_text()
    tox = (REPO / "tox.ini").read_text()
    matrix = tox[tox.index("[testenv:matrix]"):].split("\n[", 1)[0]
    assert re.findall(r"--leg vm .*?--kernel-version (\S+)", matrix) == series
    assert re.findall(r"--leg host --kernel-version (\S+)", matrix) == series
    workflow = (REPO / ".github" / "workflows" / "fscache.yml").read_text()
    assert re.search(r"kernel: \[(.*)\]", workflow).group(1) == ", ".join(f'"{s}"' for s in series)
