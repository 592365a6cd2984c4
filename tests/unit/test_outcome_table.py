"""README.md's "Bad input and faults: expected outcomes" table is generated from the parameter
tables of the fault tests (tools/outcome-table); this fails when the README's copy is stale."""

import subprocess
import sys
from pathlib import Path

from erofs_domains.base.proc import cmd

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "outcome-table"


def run(*args: str) -> subprocess.CompletedProcess:
    return cmd([sys.executable, TOOL, *args], check=False, cwd=REPO, timeout=120)


def test_readme_outcome_table_is_current():
    r = run("--check", str(REPO / "README.md"))
    assert r.returncode == 0, (
        "README.md's outcome table differs from the tests' parameter tables "
        f"(fix: tools/outcome-table --write README.md):\n{r.stderr[-4000:]}")


def test_table_covers_every_area_with_complete_rows():
    r = run()
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("| ") and not x.startswith("| Area")]
    cells = [[c.strip() for c in x.strip("|").split(" | ")] for x in lines]
    assert all(len(c) == 4 and all(c) for c in cells), [c for c in cells if len(c) != 4 or not all(c)]
    areas = {c[0] for c in cells}
    assert {"mount options", "images", "daemon replies", "daemon death", "cache space", "stress"} <= areas, areas
    assert len({c[1] for c in cells}) == len(cells), "two rows describe the same case"


def test_check_reports_a_stale_copy(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- outcome-table:begin -->\n| stale |\n<!-- outcome-table:end -->\n")
    r = run("--check", str(readme))
    assert r.returncode == 1 and "out of date" in r.stderr
    assert run("--write", str(readme)).returncode == 0
    assert run("--check", str(readme)).returncode == 0
    assert readme.read_text().startswith("# x\n\n<!-- outcome-table:begin -->\n| Area |")
