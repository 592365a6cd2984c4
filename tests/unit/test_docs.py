"""Every citation of docs/ (in code comments and between the docs) names a file and a section
that exist, and nothing cites a document outside the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

CODE_CITE = re.compile(r"docs/([\w.-]+\.md)(#[\w-]+)?")
MD_LINK = re.compile(r"\]\(([\w.-]+\.md)?(#[\w-]+)?\)")


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation but '-' and '_' dropped, blanks to '-'."""
    out = set()
    for line in md.read_text().splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add("#" + text.replace(" ", "-"))
    return out


def sources():
    for p in REPO.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(REPO).parts):
            continue
        if p.is_file() and (p.suffix in (".py", ".md") or p.parent.name == "tools"):
            yield p


def test_citations_of_docs_resolve():
    bad = []
    for p in sources():
        text = p.read_text(errors="replace")
        cites = [(m.group(1), m.group(2)) for m in CODE_CITE.finditer(text)]
        if p.parent == DOCS:
            cites += [(m.group(1) or p.name, m.group(2)) for m in MD_LINK.finditer(text)]
        for name, anchor in cites:
            target = DOCS / name
            if not target.exists():
                bad.append(f"{p.relative_to(REPO)}: docs/{name} does not exist")
                continue
            if anchor and anchor not in anchors(target):
                bad.append(f"{p.relative_to(REPO)}: docs/{name}{anchor}: no such section")
    assert not bad, "\n".join(bad)


def test_nothing_cites_a_document_outside_the_repository():
    bad = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
           for p in sources() if p.name != "test_docs.py"
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if re.search(r"reference §|/work/shared/|ondemand-protocol\.md", line)]
    assert not bad, "\n".join(bad)


def test_versions_doc_rule_tables_are_generated_from_the_rules():
    from erofs_domains.host import versions_doc

    d = versions_doc.diff()
    assert not d, ("docs/versions.md's rule tables differ from erofs_domains/guest/kernel_features.py RULES: run "
                   "python3 -m erofs_domains.host.versions_doc --write\n" + d[:3000])


def test_versions_doc_generator_rewrites_only_its_blocks():
    from erofs_domains.host import versions_doc

    b, e = versions_doc.BEGIN.format(name="rules"), versions_doc.END.format(name="rules")
    b2, e2 = versions_doc.BEGIN.format(name="evidence"), versions_doc.END.format(name="evidence")
    text = f"prose before\n{b}\nstale\n{e}\nprose between\n{b2}\n{e2}\nprose after\n"
    out = versions_doc.render(text)
    assert out.startswith("prose before\n") and "\nprose between\n" in out and out.endswith("prose after\n")
    assert "stale" not in out and "| `sysfs_path_ioctl` | >= 6.11 |" in out
    assert "| `read_complete_object_check` | `cachefiles: add consistency check" in out
