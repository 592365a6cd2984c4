"""tox's vm env runs two pytest legs with the same {posargs}: the domain tests in VM workers
(`--leg vm`) and the known-kernel-bug probes that boot VMs of their own from the host
(`--leg host`). Each leg takes, of the paths the user named, those under its own directories,
and runs its directories when none were named; a leg left with nothing to run passes, saying so.
So `tox -e vm -- tests/pagecache` or `-- -k smoke` runs what was asked in the leg that owns it.
"""

from pathlib import Path

LEGS = {
    "vm": ("tests/fscache", "tests/pagecache"),
    "host": ("tests/host",),
}


def _under(arg: str, directory: str, repo: Path) -> bool:
    path = Path(arg.split("::", 1)[0])
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    return path.is_relative_to((repo / directory).resolve())


def owns(leg: str, arg: str, repo: Path) -> bool:
    return any(_under(arg, d, repo) for d in LEGS[leg])


def select(leg: str, named: list[str] | None, repo: Path) -> list[str]:
    """The paths this leg runs: `named` (the user's positional arguments, None when there were
    none) restricted to the leg's directories, or the leg's existing directories."""
    dirs = LEGS[leg]
    if named is None:
        return [str(repo / d) for d in dirs if (repo / d).is_dir()]
    return [a for a in named if owns(leg, a, repo)]


def nothing_selected(leg: str, named: list[str] | None) -> str:
    return (f"--leg {leg}: none of {' '.join(named or [])} is under {' or '.join(LEGS[leg])}; "
            "nothing to run in this leg")


def vm_workers(tx_specs: list[str] | None) -> int:
    """How many VM workers xdist's `--tx` specs start (`2*popen//python=tools/vm-python`: 2)."""
    return sum(int(tx.split("*", 1)[0]) if "*" in tx else 1 for tx in (tx_specs or []) if "vm-python" in tx)
