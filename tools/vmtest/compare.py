"""Compare two kernels' runs of the suite, test by test (pure: no I/O but reading JSON Lines).

Input: the observables files fixtures/record.py writes (one JSON object per test: nodeid,
outcome, rule, duration, observables), a first run and reruns on each side.  A test whose
first runs differ is rerun on both sides; it is a change only when every run of a side
agrees and the sides disagree, otherwise it is flaky.

Groups, in report order:
  newly failing         B fails (or errors) where A does not; the exit status gates on
                        those A passed
  newly passing         A fails where B does not
  outcome changed       any other outcome change (skipped <-> passed, xfailed ...)
  changed observables   same outcome, an observable (or the failure's first line) moved
  flaky                 differed in the first runs, not consistently on rerun
  only in A / only in B collected on one side only
  unchanged             counted
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from fixtures.record import Normalizer

FAILING = frozenset({"failed", "error"})
GROUPS = ("newly failing", "newly passing", "outcome changed", "changed observables", "flaky",
          "only in A", "only in B")
TITLES = {
    "newly failing": "Newly failing (B fails what A does not)",
    "newly passing": "Newly passing",
    "outcome changed": "Outcome changed",
    "changed observables": "Same outcome, changed observables",
    "flaky": "Flaky (a first-run difference that reruns did not confirm)",
    "only in A": "Only in A",
    "only in B": "Only in B",
}
ABSENT = "-"


@dataclass(frozen=True)
class Run:
    outcome: str
    rule: str | None = None
    observables: dict = field(default_factory=dict)
    duration: float = 0.0

    def facts(self) -> dict:
        """Everything compared: the observables, plus the failure's first line when failing."""
        out = dict(self.observables)
        if self.outcome in FAILING and self.rule:
            out["failure"] = self.rule
        return out


def parse_runs(lines) -> list[dict[str, Run]]:
    """JSON Lines (as fixtures/record.py writes them) -> runs: the k-th line of a test goes to
    the k-th run."""
    runs: list[dict[str, Run]] = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        d = json.loads(line)
        # Names are numbered where the test ran (fixtures/record.py); numbering them again
        # here catches what an older recorder left (idempotent on "d#1").
        norm = Normalizer()
        run = Run(d["outcome"], d.get("rule") and norm(d["rule"]), norm.observables(d.get("observables") or {}),
                  d.get("duration", 0.0))
        for r in runs:
            if d["nodeid"] not in r:
                r[d["nodeid"]] = run
                break
        else:
            runs.append({d["nodeid"]: run})
    return runs


def load_runs(path: Path) -> list[dict[str, Run]]:
    path = Path(path)
    return parse_runs(path.read_text().splitlines()) if path.exists() else []


def first_run_differs(a: Run, b: Run) -> bool:
    return a.outcome != b.outcome or a.facts() != b.facts()


def differing(a: dict[str, Run], b: dict[str, Run]) -> list[str]:
    """Tests to rerun: present on both sides, and their outcome or a fact differs."""
    return [n for n in a if n in b and first_run_differs(a[n], b[n])]


def _stable(values: list) -> bool:
    return all(v == values[0] for v in values)


def _show(values: list) -> str:
    """One value, or every distinct value of the runs when they disagree."""
    distinct = list(dict.fromkeys(ABSENT if v is None else str(v) for v in values))
    return distinct[0] if len(distinct) == 1 else " | ".join(distinct)


def _outcomes(runs: list[Run]) -> str:
    c = Counter(r.outcome for r in runs)
    if len(c) == 1:
        return runs[0].outcome
    return ", ".join(f"{o} {n}/{len(runs)}" for o, n in c.most_common())


@dataclass
class TestDiff:
    nodeid: str
    a: list[Run]
    b: list[Run]
    group: str = "unchanged"
    moved: list[tuple[str, str, str]] = field(default_factory=list)   # confirmed: (key, A, B)
    unsteady: list[tuple[str, str, str]] = field(default_factory=list)  # varied between runs of a side

    @property
    def outcome_a(self) -> str:
        return _outcomes(self.a) if self.a else ABSENT

    @property
    def outcome_b(self) -> str:
        return _outcomes(self.b) if self.b else ABSENT

    @property
    def rule(self) -> str:
        """The failure's first line: B's when B fails, else A's."""
        for runs in (self.b, self.a):
            for r in runs:
                if r.outcome in FAILING and r.rule:
                    return r.rule
        return ""

    @property
    def gates(self) -> bool:
        """B fails a test that A passes (every run of each side)."""
        return self.group == "newly failing" and all(r.outcome == "passed" for r in self.a)

    @property
    def reruns(self) -> int:
        return max(len(self.a), len(self.b)) - 1

    def to_json(self) -> dict:
        return {"nodeid": self.nodeid, "group": self.group, "A": self.outcome_a, "B": self.outcome_b,
                "rule": self.rule or None, "runs": {"A": len(self.a), "B": len(self.b)},
                "moved": [{"observable": k, "A": va, "B": vb} for k, va, vb in self.moved],
                "unsteady": [{"observable": k, "A": va, "B": vb} for k, va, vb in self.unsteady]}


def classify(nodeid: str, a: list[Run], b: list[Run]) -> TestDiff:
    d = TestDiff(nodeid, a, b)
    if not a or not b:
        d.group = "only in B" if not a else "only in A"
        return d
    oa, ob = {r.outcome for r in a}, {r.outcome for r in b}
    keys = list(dict.fromkeys(k for r in a + b for k in r.facts()))
    for k in keys:
        va = [r.facts().get(k) for r in a]
        vb = [r.facts().get(k) for r in b]
        if _stable(va) and _stable(vb):
            if va[0] != vb[0]:
                d.moved.append((k, _show(va), _show(vb)))
        else:
            d.unsteady.append((k, _show(va), _show(vb)))
    if len(oa) > 1 or len(ob) > 1:
        d.group = "flaky"
    elif oa != ob:
        (a1,), (b1,) = oa, ob
        if b1 in FAILING and a1 not in FAILING:
            d.group = "newly failing"
        elif a1 in FAILING and b1 not in FAILING:
            d.group = "newly passing"
        else:
            d.group = "outcome changed"
    elif d.moved:
        d.group = "changed observables"
    elif d.unsteady and first_run_differs(a[0], b[0]):
        d.group = "flaky"
    return d


@dataclass
class Comparison:
    label_a: str
    label_b: str
    tests: list[TestDiff]
    meta: dict = field(default_factory=dict)  # selection, seed, reruns, times

    @classmethod
    def of(cls, label_a: str, label_b: str, runs_a: list[dict[str, Run]], runs_b: list[dict[str, Run]],
           meta: dict | None = None) -> Comparison:
        """runs_x[0] is the first run of side x, later items its reruns (of some tests)."""
        order = list(dict.fromkeys(list(runs_a[0]) + list(runs_b[0]) if runs_a and runs_b else []))
        tests = []
        for n in order:
            a = [r[n] for r in runs_a if n in r]
            b = [r[n] for r in runs_b if n in r]
            tests.append(classify(n, a, b))
        return cls(label_a, label_b, tests, dict(meta or {}))

    def group(self, name: str) -> list[TestDiff]:
        return [t for t in self.tests if t.group == name]

    @property
    def unchanged(self) -> list[TestDiff]:
        return self.group("unchanged")

    @property
    def regressions(self) -> list[TestDiff]:
        return [t for t in self.tests if t.gates]

    @property
    def exit_status(self) -> int:
        return 1 if self.regressions else 0

    def to_json(self) -> dict:
        return {"A": self.label_a, "B": self.label_b, "meta": self.meta,
                "exit_status": self.exit_status,
                "groups": {g: [t.to_json() for t in self.group(g)] for g in GROUPS},
                "unchanged": {"count": len(self.unchanged),
                              "outcomes": dict(Counter(t.outcome_a for t in self.unchanged))}}

    # ------------------------------------------------------------- rendering
    def render(self, fmt: str = "simple", max_rows: int = 15) -> str:
        """The report: `simple` for a terminal, `github` for Markdown (a mail reply)."""
        md = fmt == "github"
        out = []
        head = f"A: {self.label_a}\nB: {self.label_b}"
        if self.meta:
            head += "\n" + "\n".join(f"{k}: {v}" for k, v in self.meta.items())
        out.append(_block(head, md))
        for g in GROUPS:
            tests = self.group(g)
            if not tests:
                continue
            title = f"{TITLES[g]}: {len(tests)}"
            out.append(f"### {title}" if md else f"{title}\n{'=' * len(title)}")
            rows = [(t.nodeid, t.outcome_a, t.outcome_b, t.rule) for t in tests]
            out.append(tabulate(rows, headers=("test", "A", "B", "rule (first line of the failure)"),
                                tablefmt=fmt, disable_numparse=True))
            for t in tests:
                if t.moved or t.unsteady:
                    out.append(_moved_table(t, fmt, max_rows))
        summary = ", ".join(f"{o} {n}" for o, n in Counter(t.outcome_a for t in self.unchanged).most_common())
        line = f"Unchanged: {len(self.unchanged)} tests" + (f" ({summary})" if summary else "")
        out.append(f"### {line}" if md else line)
        if self.regressions:
            out.append(f"{len(self.regressions)} test(s) that A passes fail on B.")
        return "\n\n".join(out) + "\n"


def _block(text: str, md: bool) -> str:
    return f"```\n{text}\n```" if md else text


# What a maintainer reads first: the failure, mount errnos, kernel log, the daemon's requests,
# then fscache objects, stats and cache files.
ORDER = ("failure", "mount ", "kmsg ", "daemon ", "volume ", "cookie ", "stats ", "cache file")


def rank(key: str) -> int:
    return next((i for i, prefix in enumerate(ORDER) if key.startswith(prefix)), len(ORDER))


def _moved_table(t: TestDiff, fmt: str, max_rows: int) -> str:
    rows = sorted([(k, va, vb) for k, va, vb in t.moved], key=lambda r: rank(r[0]))
    rows += [(f"{k} (varies between runs)", va, vb) for k, va, vb in t.unsteady]
    more = len(rows) - max_rows
    rows = rows[:max_rows]
    runs = f"{len(t.a)} run(s) of A, {len(t.b)} of B"
    text = tabulate(rows, headers=("observable", "A", "B"), tablefmt=fmt, disable_numparse=True)
    if more > 0:
        text += f"\n... {more} more (see the JSON report)"
    title = f"{t.nodeid}: observables that moved ({runs})"
    return f"**{title}**\n\n{text}" if fmt == "github" else f"{title}\n{text}"
