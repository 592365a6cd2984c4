"""The package's layers and the one direction of their imports (docs/architecture.md).

  base      standard library only: cmd(), digests, erofs-utils probe, the run configuration
  programs  what the suite runs as `python -m`: on-demand daemon, blob server, netns helper
  guest     what runs where the kernel under test runs: rules, mounts, images, observers,
            oracles, the fscache and page-cache rigs (guest.fscache, guest.pagecache)
  host      the controller: builds, VMs and their guard, crash reports, compare, bisect
  fixtures  the pytest plugin: options, fixtures, recording, skip-or-fail

A module imports from its own layer and the ones listed before it, never from a later one;
no two modules import each other, directly or around a circle (imports inside functions
count: a deferred import hides a circle, it does not remove it). Imports under
`if TYPE_CHECKING:` are annotations only and do not count.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("erofs_domains.base", "erofs_domains.programs", "erofs_domains.guest", "erofs_domains.host", "fixtures")
SIBLINGS = (("erofs_domains.guest.fscache", "erofs_domains.guest.pagecache"),)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    mods = {}
    for top in ("erofs_domains", "fixtures"):
        for p in (REPO / top).rglob("*.py"):
            mods[module_name(p)] = p
    return mods


def _type_checking_block(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (anywhere in the file but TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for blk in ast.walk(tree) if _type_checking_block(blk) for n in ast.walk(blk)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = library_modules()
    known = set(mods)
    # A package's __init__ is where its name resolves; importing a submodule is not importing it.
    return {m: {t for t in imports_of(m, p, known) if not m.startswith(t + ".")} for m, p in mods.items()}


def layer(mod: str) -> int:
    """The layer's index; -1 for a module outside every layer (the empty top-level __init__)."""
    return max((i for i, prefix in enumerate(LAYERS) if mod == prefix or mod.startswith(prefix + ".")), default=-1)


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})"
                  for m, ts in g.items() for t in ts if layer(t) > layer(m))


def sibling_imports(g: dict[str, set[str]]) -> list[str]:
    out = []
    for a, b in SIBLINGS:
        for m, ts in g.items():
            for t in ts:
                for x, y in ((a, b), (b, a)):
                    if m.startswith(x + ".") and (t == y or t.startswith(y + ".")):
                        out.append(f"{m} imports {t}")
    return sorted(out)


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_library_module_is_in_a_layer():
    assert [m for m in library_modules() if layer(m) < 0] == ["erofs_domains"]
    assert (REPO / "erofs_domains" / "__init__.py").read_text().strip().startswith('"""'), "a docstring, no code"


def test_imports_go_down_the_layers():
    assert upward_imports(graph()) == [], "an import climbs back up (see this module's docstring)"


def test_fscache_and_pagecache_rigs_do_not_import_each_other():
    assert sibling_imports(graph()) == []


def test_no_import_circles():
    assert circles(graph()) == [], "modules import each other around a circle"


def test_the_checker_sees_an_upward_import_and_a_circle():
    g = {"erofs_domains.base.proc": {"fixtures.plugin"}, "fixtures.plugin": {"erofs_domains.base.proc"}}
    assert upward_imports(g) == ["erofs_domains.base.proc (erofs_domains.base) imports fixtures.plugin (fixtures)"]
    assert circles(g) == [["erofs_domains.base.proc", "fixtures.plugin"]]


def test_deferred_imports_count_and_type_checking_ones_do_not(tmp_path, monkeypatch):
    pkg = tmp_path / "erofs_domains" / "base"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
                              "def f():\n    from erofs_domains.base import c\n")
    known = {"erofs_domains.base.a", "erofs_domains.base.b", "erofs_domains.base.c"}
    assert imports_of("erofs_domains.base.a", pkg / "a.py", known) == {"erofs_domains.base.c"}
