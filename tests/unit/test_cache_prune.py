"""erofs_domains/host/cachegc.py and tools/cache: the cache root stays bounded (launch
scripts, kernels, build directories and images are pruned, the recent ones kept)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from erofs_domains.host import cachegc

REPO = Path(__file__).resolve().parents[2]

NOW = 1_800_000_000.0
DAY = cachegc.DAY


def make(root: Path, kind: str, name: str, age: float, files=("bzImage",)) -> Path:
    p = root / kind / name
    if name.endswith((".sh", ".json")):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
        os.utime(p, (NOW - age, NOW - age))
        return p
    p.mkdir(parents=True)
    for f in files:
        (p / f).write_text("x")
        os.utime(p / f, (NOW - age, NOW - age))
    os.utime(p, (NOW - age, NOW - age))
    return p


def test_prune_keeps_the_most_recently_used_and_everything_young(tmp_path):
    old = [make(tmp_path, "kernels", f"k{i}", age=(10 + i) * DAY) for i in range(9)]
    young = make(tmp_path, "kernels", "young", age=3600)
    kind = cachegc.BY_NAME["kernels"]
    gone = cachegc.prunable(tmp_path, kind, NOW)
    # keep 6: young + k0..k4; the rest are older than a day
    assert sorted(p.name for p in gone) == ["k5", "k6", "k7", "k8"]
    assert young not in gone and old[0] not in gone
    assert cachegc.prune(tmp_path, [kind], NOW) == {"kernels": 4}
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == ["k0", "k1", "k2", "k3", "k4", "young"]


def test_a_kernel_booted_recently_counts_as_used_whenever_it_was_built(tmp_path):
    kind = cachegc.BY_NAME["kernels"]
    for i in range(8):
        make(tmp_path, "kernels", f"k{i}", age=(10 + i) * DAY)
    cachegc.mark_used(tmp_path / "kernels" / "k7" / "bzImage")  # the oldest, booted now
    assert "k7" not in [p.name for p in cachegc.prunable(tmp_path, kind, time.time())]


def test_nothing_used_within_a_day_goes_even_past_keep(tmp_path):
    for i in range(60):
        make(tmp_path, "launch", f"{i}.sh", age=60 + i)
    kind = cachegc.BY_NAME["launch"]
    assert cachegc.prunable(tmp_path, kind, NOW) == [], "a launch script younger than an hour may be booting"
    for i in range(60, 80):
        make(tmp_path, "launch", f"{i}.sh", age=2 * 3600 + i)
    # 80 scripts, 50 kept: of the 30 past keep, the 10 young ones stay too
    assert len(cachegc.prunable(tmp_path, kind, NOW)) == 20


def test_sources_go_only_on_request(tmp_path):
    for i in range(5):
        make(tmp_path, "src", f"linux-{i}", age=100 * DAY, files=("Makefile",))
    assert cachegc.prune(tmp_path, cachegc.KINDS, NOW) == {}
    assert cachegc.clear(tmp_path, [cachegc.BY_NAME["src"]]) == {"src": 5}
    assert list((tmp_path / "src").iterdir()) == []


def test_in_progress_entries_are_not_listed(tmp_path):
    make(tmp_path, "images", ".build-0123", age=100 * DAY, files=("image.json",))
    assert cachegc.entries(tmp_path, cachegc.BY_NAME["images"]) == []


def test_the_command_lists_prunes_and_clears(tmp_path):
    env = {**os.environ, "EROFS_TEST_CACHE": str(tmp_path)}
    for i in range(8):
        make(tmp_path, "kernels", f"k{i}", age=(10 + i) * DAY + (NOW - time.time()))
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "tools" / "cache"), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    assert "--prune" in run("--help")
    listing = run("--list")
    assert re.search(r"^kernels +8 ", listing, re.M) and "2 (" in listing, listing
    assert "2 kernels" in run("--prune")
    assert "6 kernels" in run("--clear", "kernels")
    assert list((tmp_path / "kernels").iterdir()) == []
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "cache"), "--clear", "nonsense"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown kind" in bad.stderr
