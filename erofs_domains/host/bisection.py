"""Find the first commit that breaks one test (tools/bisect).

The commits are tested in a git worktree of their own (cache/bisect/<hash of the repository>/
tree, `git worktree add --detach`), never in the user's tree, and with one build directory:
each step checks a commit out there (git rewrites only the files that differ, with a new
mtime) and rebuilds incrementally.  The first time, the build directory starts as a copy of
the tree's own build directory when the suite built the tree before
(variants.seed_builddir), with every file that differs from that tree marked new.

A commit that does not build (tools/build-kernel's exit 125) or whose test is skipped is
skipped, like `git bisect skip`; the search goes on with its neighbours.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.proc import CmdError, cmd
from erofs_domains.host import compare, deps, variants
from erofs_domains.host import kernel_build as kernel


def git(repo: Path, *args: str) -> str:
    try:
        return cmd(["git", "-C", repo, *args]).stdout.strip()
    except CmdError as e:
        raise deps.ToolError(str(e)) from e


def commits_between(repo: Path, good: str, bad: str) -> list[str]:
    """Commits after `good` up to and including `bad`, oldest first (first-parent history)."""
    revs = git(repo, "rev-list", "--reverse", "--first-parent", f"{good}..{bad}").split()
    if not revs:
        raise deps.ToolError(f"no commits between {good} and {bad} (is {good} an ancestor of {bad}?)")
    return revs


@dataclass
class Step:
    commit: str
    verdict: str  # good, bad, skip
    detail: str = ""
    build_s: float = 0.0
    test_s: float = 0.0


@dataclass
class Search:
    """Binary search over commits[0..n-1] (commits[-1] is bad, its parent `good` is good)."""

    commits: list[str]
    steps: dict[int, Step] = field(default_factory=dict)

    def bounds(self) -> tuple[int, int]:
        lo = max([i for i, s in self.steps.items() if s.verdict == "good"], default=-1)
        hi = min([i for i, s in self.steps.items() if s.verdict == "bad"], default=len(self.commits) - 1)
        return lo, hi

    def next(self) -> int | None:
        """The next commit to test, or None when the culprit (or a skipped range) is found."""
        lo, hi = self.bounds()
        candidates = [i for i in range(lo + 1, hi) if i not in self.steps]
        if not candidates:
            return None
        mid = (lo + hi) / 2
        return min(candidates, key=lambda i: (abs(i - mid), i))

    def culprits(self) -> list[int]:
        """The first bad commit, or the skipped commits before it that could be it as well."""
        lo, hi = self.bounds()
        return list(range(lo + 1, hi + 1))


def worktree(repo: Path, rev: str, log) -> Path:
    """This repository's bisect worktree (created at `rev` the first time)."""
    common = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir"))
    wt = cache_root() / "bisect" / hashlib.sha256(str(common).encode()).hexdigest()[:12] / "tree"
    if not (wt / ".git").exists():
        wt.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "worktree", "prune")
        git(repo, "worktree", "add", "--detach", str(wt), rev)
        log(f"worktree {wt} created at {rev[:12]}")
    return wt  # an existing one stays where it is: build_commit checks each commit out


def checkout(wt: Path, rev: str) -> None:
    """Check `rev` out in our worktree, rewriting only the files that differ: the index is
    refreshed first (a file whose mtime changed is stat-dirty, and a forced checkout would
    write it again with a new mtime, so make would rebuild what depends on it)."""
    cmd(["git", "-C", wt, "update-index", "-q", "--refresh"], check=False)  # exit 1: files were stat-dirty
    git(wt, "checkout", "-q", "--detach", rev)


def seed_from_tree(repo: Path, wt: Path, build, log, seed: Path | None = None) -> None:
    """A new worktree's build directory starts as a copy of a built tree's (`seed`, default the
    repository's own tree, when the suite built it): the worktree's files equal to the seed's
    get an old mtime, the files that differ keep their new one, so make rebuilds just those."""
    seed = (seed or repo).resolve()
    src_build = variants.builddir_for(seed, build.options)
    dst_build = build.builddir
    if dst_build.exists() or not (src_build / "vmlinux").exists():
        return
    start = time.monotonic()
    old = (src_build / ".config").stat().st_mtime - 86400
    if seed == repo.resolve():
        changed = set(git(repo, "diff", "--name-only", "HEAD").split()) | set(
            git(repo, "diff", "--name-only", "HEAD", git(wt, "rev-parse", "HEAD")).split())
        same = lambda rel: rel not in changed  # noqa: E731
    else:
        same = lambda rel: variants.same_file(wt / rel, seed / rel)  # noqa: E731
    n = 0
    for dirpath, dirnames, filenames in os.walk(wt):
        if dirpath == str(wt):
            dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            p = os.path.join(dirpath, name)
            if same(os.path.relpath(p, wt)):
                os.utime(p, (old, old), follow_symlinks=False)
            else:
                n += 1
    cmd(["git", "-C", wt, "update-index", "-q", "--refresh"], check=False)  # exit 1: files were stat-dirty
    variants.seed_builddir(src_build, dst_build, seed, wt)
    variants.settle_tools(build, src_build, [], log)
    log(f"build directory seeded from {src_build} in {time.monotonic() - start:.0f} s "
        f"({n} file(s) differ from {seed})")


def verdict_of(observables: Path, test_id: str) -> tuple[str, str]:
    """(good|bad|skip, failure's first line) of one test from a run's observables."""
    runs = compare.load_runs(observables)
    recs = [r[n] for r in runs for n in r if n == test_id or n.endswith(test_id)]
    if not recs:
        return "skip", "the test did not run (no result)"
    rec = recs[0]
    if rec.outcome in compare.FAILING:
        return "bad", rec.rule or rec.outcome
    if rec.outcome in ("passed", "xpassed"):
        return "good", ""
    return "skip", f"test {rec.outcome}: {rec.rule or ''}"


def build_commit(wt: Path, commit: str, profile: str, log) -> tuple[Path | None, str, float]:
    """Check out and build a commit; (bzImage or None when it does not build, why, seconds)."""
    start = time.monotonic()
    checkout(wt, commit)
    try:
        _, build = variants.base_build(variants.Side("bisect", tree=wt), profile)
        return build.build(), "", time.monotonic() - start
    except kernel.BuildFailed as e:
        return None, str(e).splitlines()[-1] if str(e) else "does not build", time.monotonic() - start
