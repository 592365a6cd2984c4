"""docs/versions.md's rule tables, generated from erofs_domains/guest/kernel_features.py RULES.

The doc keeps its prose by hand; only the text between a pair of markers

    <!-- BEGIN generated: NAME (python3 -m erofs_domains.host.versions_doc --write) -->
    <!-- END generated: NAME -->

is written here: NAME `rules` (what each rule says and its range) and `evidence` (the commit,
mainline release, first release per stable series and where each was checked).

    python3 -m erofs_domains.host.versions_doc --check    # exit 1 and a diff when the doc is out of date
    python3 -m erofs_domains.host.versions_doc --write    # rewrite the blocks
"""

import difflib
import re
import sys
from pathlib import Path

from erofs_domains.base.layout import REPO
from erofs_domains.guest.kernel_features import RULES, SERIES, Rule

DOC = REPO / "docs" / "versions.md"
BEGIN = "<!-- BEGIN generated: {name} (python3 -m erofs_domains.host.versions_doc --write) -->"
END = "<!-- END generated: {name} -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _holds_on(rule: Rule) -> str:
    extra = f" (+ {', '.join(f'`{o}`' for o in rule.config)})" if rule.config else ""
    return rule.kernels() + extra


def rules_table() -> str:
    rows = ["| Rule | Holds on | What holds there (elsewhere) | Behind it |", "|---|---|---|---|"]
    for r in RULES.values():
        what = r.holds + (f" (elsewhere: {r.otherwise})" if r.otherwise else "")
        rows.append(f"| `{r.name}` | {_cell(_holds_on(r))} | {_cell(what)} | {_cell(r.source)} |")
    return "\n".join(rows)


def evidence_table() -> str:
    head = "| Rule | Upstream commit | Mainline | " + " | ".join(SERIES) + " | Checked in |"
    rows = [head, "|" + "---|" * (4 + len(SERIES))]
    for r in RULES.values():
        ev = r.evidence
        if ev is None:
            rows.append(f"| `{r.name}` | **no evidence** |" + " |" * (3 + len(SERIES)))
            continue
        mainline = ev.mainline + (f"; ends {ev.ended}" if ev.ended else "")
        cells = [f"`{r.name}`", ev.commit, mainline, *(ev.series(s) for s in SERIES), "; ".join(ev.checked)]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


BLOCKS = {"rules": rules_table, "evidence": evidence_table}


def render(text: str) -> str:
    """`text` with every generated block replaced by its current content."""
    for name, make in BLOCKS.items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"{DOC.name}: no block `{begin}` ... `{end}`")
        text = pattern.sub(lambda _m, b=begin, e=end, m=make: f"{b}\n{m()}\n{e}", text, count=1)
    return text


def diff(path: Path = DOC) -> str:
    old = path.read_text()
    new = render(old)
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        f"{path} (as committed)",
                                        "generated from erofs_domains/guest/kernel_features.py RULES"))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"]:
        DOC.write_text(render(DOC.read_text()))
        return 0
    d = diff()
    if d:
        sys.stdout.write(d)
        print(f"{DOC} is out of date: run python3 -m erofs_domains.host.versions_doc --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
