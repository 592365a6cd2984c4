"""Compare two kernels' runs of the suite, test by test (pure: no I/O but reading JSON Lines).

Input: the observables files fixtures/record.py writes (one JSON object per test: nodeid,
outcome, rule, duration, observables), a first run and reruns on each side.  A test whose
first runs differ is rerun on both sides; it is a change only when every run of a side
agrees and the sides disagree, otherwise it is flaky.

Groups, in report order:
  newly failing         B fails (or errors) where A does not; the exit status gates on
                        those A passed
  newly passing         A fails where B does not
  known kernel bug      skipped on one side as a known bug (rule bug_*), which tests/host
                        probes in a VM of its own: the probe's verdict and console lines
  version rule skip     skipped on one side because a version rule (erofs_domains/guest/kernel_features.py)
                        does not hold there: the rule and its range
  outcome changed       any other outcome change (skipped <-> passed, xfailed ...)
  changed observables   same outcome, an observable (or the failure's first line) moved that
                        no differing version rule explains
  changed by rules      same outcome; every moved observable is a rule the test asked about
                        that differs between the two kernels, or a log line such a rule words
  flaky                 differed in the first runs, not consistently on rerun
  only in A / only in B collected on one side only
  unchanged             counted
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from erofs_domains.guest.observables import Normalizer

FAILING = frozenset({"failed", "error"})
GROUPS = ("newly failing", "newly passing", "known kernel bug", "version rule skip", "outcome changed",
          "changed observables", "changed by rules", "flaky", "only in A", "only in B")
TITLES = {
    "newly failing": "Newly failing (B fails what A does not)",
    "newly passing": "Newly passing",
    "known kernel bug": "Known kernel bug (skipped on one side; tests/host probes it in a VM of its own)",
    "version rule skip": "Skipped on one side by a version rule (erofs_domains/guest/kernel_features.py)",
    "outcome changed": "Outcome changed",
    "changed observables": "Same outcome, changed observables",
    "changed by rules": "Same outcome, observables moved as version rules say",
    "flaky": "Flaky (a first-run difference that reruns did not confirm)",
    "only in A": "Only in A",
    "only in B": "Only in B",
}
ABSENT = "-"
# Skip reasons of erofs_domains/guest/kernel_features.py: KernelFeatures.why_not() and Requirements.not_bug()
RULE_SKIP = re.compile(r"\brule (\w+) \((.*?)\) does not apply to kernel (\S+?)(?::|$)")
BUG_SKIP = re.compile(r"^known kernel bug on (\S+) \(rule (\w+), (.*?)\): ")
# The probe of each known bug (tests/host, a VM of its own)
BUG_PROBES = {
    "bug_shared_primary_inode":
        "tests/host/test_kernel_bug.py::test_device_naming_a_member_fsid_frees_inode_of_live_cookie",
    "bug_cachefiles_key47": "tests/host/test_kernel_bug.py::test_domain_fsid_253_bytes_hits_cachefiles_bug[253]",
    "bug_remount_inode_share": "tests/host/test_kernel_bug.py::test_remount_turning_inode_share_on_without_a_domain",
}


@dataclass(frozen=True)
class Run:
    outcome: str
    rule: str | None = None
    observables: dict = field(default_factory=dict)
    duration: float = 0.0
    detail: tuple[str, ...] = ()  # the message's further lines (a probe's console lines)

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
                  d.get("duration", 0.0), tuple(d.get("detail") or ()))
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


@dataclass(frozen=True)
class Declared:
    """A skip erofs_domains/guest/kernel_features.py declares: a version rule that does not hold, or a known bug."""
    kind: str  # "version rule skip" | "known kernel bug"
    rule: str
    kernels: str
    release: str

    @property
    def doc(self) -> str | None:
        rule = _rules().get(self.rule)
        return rule.doc if rule is not None else None


def declared_skip(run: Run) -> Declared | None:
    if run.outcome != "skipped" or not run.rule:
        return None
    if m := BUG_SKIP.search(run.rule):
        return Declared("known kernel bug", m.group(2), m.group(3), m.group(1))
    if m := RULE_SKIP.search(run.rule):
        return Declared("version rule skip", m.group(1), m.group(2), m.group(3))
    return None


def _declared_difference(a: Run, b: Run) -> bool:
    """One side skipped as the rule table declares and the other did not fail: nothing a rerun
    can change (the skip is decided by the kernel's version before the test runs)."""
    return any(declared_skip(x) and declared_skip(y) is None and y.outcome not in FAILING
               for x, y in ((a, b), (b, a)))


def differing(a: dict[str, Run], b: dict[str, Run],
              releases: tuple[str | None, str | None] = (None, None)) -> list[str]:
    """Tests to rerun: present on both sides, and their outcome or a fact differs; not the
    declared skips, nor a test whose every moved observable is a differing version rule or a log
    line such a rule words (the rule table says so; a rerun cannot tell more)."""
    rules = rules_between(*releases)

    def declared(n: str) -> bool:
        if _declared_difference(a[n], b[n]):
            return True
        d = classify(n, [a[n]], [b[n]], rules, releases[0])
        asked = _asked(d.moved, rules)
        return d.group in ("changed by rules", "unchanged") and \
            all(_explains(k, va, vb, rules, releases[0], asked) for k, va, vb in d.moved)

    return [n for n in a if n in b and first_run_differs(a[n], b[n]) and not declared(n)]


def _rules() -> dict:
    from erofs_domains.guest.kernel_features import RULES

    return RULES


def rules_between(release_a: str | None, release_b: str | None) -> dict:
    """name -> Rule for the version rules that hold on one release and not the other."""
    if not release_a or not release_b:
        return {}
    from erofs_domains.guest.kernel_features import differing_rules, parse_release

    return {r.name: r for r in differing_rules(parse_release(release_a), parse_release(release_b))}


def _asked(moved: list[tuple[str, str, str]], rules: dict) -> list[str]:
    """The differing rules a test asked about (its moved `rule X` rows)."""
    return [k[5:] for k, *_ in moved if k.startswith("rule ") and k[5:] in rules]


def _explains(key: str, va: str, vb: str, rules: dict, release_a: str, asked=()) -> str | None:
    """The differing rule that explains one moved observable, if any: the rule itself, a log
    line present on one side only and worded as the rule says for that side, or an observable
    a rule the test asked about declares it moves (Rule.moves)."""
    from erofs_domains.guest.kernel_features import parse_release

    if key.startswith("rule ") and key[5:] in rules:
        return key[5:]
    for name in asked:
        if any(re.search(p, key) for p in rules[name].moves):
            return name
    m = re.match(r"kmsg \[log\] (.*)", key)
    if not m or (va == ABSENT) == (vb == ABSENT):
        return None
    for name, rule in rules.items():
        if not rule.log:
            continue
        holds_a = rule.in_range(parse_release(release_a))
        holds_here = holds_a if vb == ABSENT else not holds_a
        if re.search(rule.log[0 if holds_here else 1], m.group(1)):
            return name
    return None


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
    declared: Declared | None = None  # the declared skip of a "known kernel bug"/"version rule skip"
    declared_on: str = ""  # the side that skipped
    rules: dict[str, str] = field(default_factory=dict)  # moved observable -> the rule explaining it
    probe: Run | None = None  # a known bug's tests/host probe on the skipping side

    @property
    def outcome_a(self) -> str:
        return _outcomes(self.a) if self.a else ABSENT

    @property
    def outcome_b(self) -> str:
        return _outcomes(self.b) if self.b else ABSENT

    @property
    def rule(self) -> str:
        """The failure's first line: B's when B fails, else A's; else a side's skip reason
        when only one side skipped."""
        for runs in (self.b, self.a):
            for r in runs:
                if r.outcome in FAILING and r.rule:
                    return r.rule
        skipped = [runs for runs in (self.b, self.a) if runs and runs[0].outcome == "skipped"]
        if len(skipped) == 1 and skipped[0][0].rule:
            return skipped[0][0].rule
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
                "moved": [{"observable": k, "A": va, "B": vb, "by rule": self.rules.get(k)}
                          for k, va, vb in self.moved],
                "unsteady": [{"observable": k, "A": va, "B": vb} for k, va, vb in self.unsteady],
                **({"declared": {"side": self.declared_on, "rule": self.declared.rule,
                                 "kernels": self.declared.kernels, "release": self.declared.release,
                                 "doc": self.declared.doc}} if self.declared else {}),
                **({"probe": {"outcome": self.probe.outcome, "message": self.probe.rule,
                              "console": list(self.probe.detail)}} if self.probe else {})}


def classify(nodeid: str, a: list[Run], b: list[Run], rules: dict | None = None,
             release_a: str | None = None) -> TestDiff:
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
        skip_a, skip_b = declared_skip(a[0]), declared_skip(b[0])
        if b1 in FAILING and a1 not in FAILING:
            d.group = "newly failing"
        elif a1 in FAILING and b1 not in FAILING:
            d.group = "newly passing"
        elif (skip_a is None) != (skip_b is None):
            d.declared, d.declared_on = (skip_a, "A") if skip_a else (skip_b, "B")
            d.group = d.declared.kind
        else:
            d.group = "outcome changed"
    elif d.moved:
        d.rules = _attribute(d, rules or {}, release_a)
        unexplained = [k for k, *_ in d.moved if k not in d.rules]
        if unexplained:
            d.group = "changed observables"
        elif any(not k.startswith("rule ") for k, *_ in d.moved):
            d.group = "changed by rules"
        # else only the rules it asked about differ, nothing it observed: unchanged
    elif d.unsteady and first_run_differs(a[0], b[0]):
        d.group = "flaky"
    return d


def is_flaky(nodeid: str, runs_a: list[dict[str, Run]], runs_b: list[dict[str, Run]]) -> bool:
    """The runs so far already make `nodeid` flaky: its outcome or a first-run difference varied
    between the runs of a side, which further runs cannot undo."""
    a = [r[nodeid] for r in runs_a if nodeid in r]
    b = [r[nodeid] for r in runs_b if nodeid in r]
    return classify(nodeid, a, b).group == "flaky"


def _attribute(d: TestDiff, rules: dict, release_a: str | None) -> dict[str, str]:
    """Moved observable -> the differing rule that explains it: the rule rows a test recorded
    (the rules it asked about), log lines worded as a differing rule says, and what a rule the
    test asked about declares it moves.  Nothing else is attributed, even in a test that asked
    about a differing rule: fixtures ask about rules for every mount, so asking alone says
    little about what moved."""
    if not rules or not release_a:
        return {}
    asked = _asked(d.moved, rules)
    return {k: r for k, va, vb in d.moved if (r := _explains(k, va, vb, rules, release_a, asked))}


@dataclass
class Comparison:
    label_a: str
    label_b: str
    tests: list[TestDiff]
    meta: dict = field(default_factory=dict)  # selection, seed, reruns, times
    releases: tuple[str | None, str | None] = (None, None)
    rules: dict = field(default_factory=dict)  # the version rules that differ between the releases

    @classmethod
    def of(cls, label_a: str, label_b: str, runs_a: list[dict[str, Run]], runs_b: list[dict[str, Run]],
           meta: dict | None = None, releases: tuple[str | None, str | None] = (None, None),
           probes: dict[str, dict[str, Run]] | None = None) -> Comparison:
        """runs_x[0] is the first run of side x, later items its reruns (of some tests);
        `releases` the kernels' releases (for the version rules); `probes` each side's
        tests/host runs (the known bugs' probes)."""
        rules = rules_between(*releases)
        order = list(dict.fromkeys(list(runs_a[0]) + list(runs_b[0]) if runs_a and runs_b else []))
        tests = []
        for n in order:
            a = [r[n] for r in runs_a if n in r]
            b = [r[n] for r in runs_b if n in r]
            t = classify(n, a, b, rules, releases[0])
            if t.group == "known kernel bug":
                t.probe = (probes or {}).get(t.declared_on, {}).get(BUG_PROBES.get(t.declared.rule, ""))
            tests.append(t)
        return cls(label_a, label_b, tests, dict(meta or {}), tuple(releases), rules)

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

    @property
    def rerun(self) -> list[TestDiff]:
        return [t for t in self.tests if t.reruns > 0]

    def summary(self) -> list[tuple[str, int]]:
        return [(TITLES[g], len(self.group(g))) for g in GROUPS if self.group(g)] + \
            [("Unchanged", len(self.unchanged))]

    def rerun_line(self) -> str:
        rerun = self.rerun
        if not rerun:
            return "Reruns: none (no difference to confirm)" if self.meta.get("reruns") else ""
        flaky = [t for t in rerun if t.group == "flaky"]
        n = max(t.reruns for t in rerun)
        early = sum(1 for t in flaky if t.reruns < n)
        return (f"Reruns: {len(rerun)} test(s) differed in the first runs and ran {n} more time(s) on each side: "
                f"{len(rerun) - len(flaky)} confirmed, {len(flaky)} flaky"
                + (f" ({early} found flaky earlier and not rerun again)" if early else ""))

    def to_json(self) -> dict:
        return {"A": self.label_a, "B": self.label_b, "meta": self.meta,
                "releases": {"A": self.releases[0], "B": self.releases[1]},
                "rules between": {n: {"kernels": r.kernels(), "holds": r.holds} for n, r in self.rules.items()},
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
        if any(self.releases):
            head += f"\nreleases: A {self.releases[0] or '?'}, B {self.releases[1] or '?'}"
        if self.meta:
            head += "\n" + "\n".join(f"{k}: {v}" for k, v in self.meta.items() if k != "reruns")
        out.append(_block(head, md))
        out.append(_title("Summary", md))
        summary = tabulate(self.summary(), headers=("group", "tests"), tablefmt=fmt, disable_numparse=True)
        out.append(summary + (f"\n\n{self.rerun_line()}" if self.rerun_line() else ""))
        if self.rules:
            rows = [(n, r.kernels(), "holds" if r.in_range(_release(self.releases[0])) else "-",
                     "holds" if r.in_range(_release(self.releases[1])) else "-") for n, r in self.rules.items()]
            out.append(_title(f"Version rules that differ between {self.releases[0]} and {self.releases[1]}", md))
            out.append(tabulate(rows, headers=("rule", "holds on", "A", "B"), tablefmt=fmt, disable_numparse=True))
        for g in GROUPS:
            tests = self.group(g)
            if tests:
                out += _group(g, tests, fmt, max_rows)
        summary = ", ".join(f"{o} {n}" for o, n in Counter(t.outcome_a for t in self.unchanged).most_common())
        line = f"Unchanged: {len(self.unchanged)} tests" + (f" ({summary})" if summary else "")
        out.append(f"### {line}" if md else line)
        if self.regressions:
            out.append(f"{len(self.regressions)} test(s) that A passes fail on B.")
        return "\n\n".join(out) + "\n"


def _release(text):
    from erofs_domains.guest.kernel_features import parse_release

    return parse_release(text or "")


def _title(title: str, md: bool) -> str:
    return f"### {title}" if md else f"{title}\n{'=' * len(title)}"


def _group(g: str, tests: list[TestDiff], fmt: str, max_rows: int) -> list[str]:
    md = fmt == "github"
    out = [_title(f"{TITLES[g]}: {len(tests)}", md)]
    if g in ("known kernel bug", "version rule skip"):
        rows = [(t.nodeid, t.outcome_a, t.outcome_b, t.declared.rule, t.declared.kernels,
                 f"{t.declared_on} ({t.declared.release})") for t in tests]
        heads = ["test", "A", "B", "known bug" if g == "known kernel bug" else "rule", "holds on", "skipped on"]
        if g == "known kernel bug":
            rows = [r + (t.declared.doc or "-",) for r, t in zip(rows, tests)]
            heads.append("write-up")
        out.append(tabulate(rows, headers=heads, tablefmt=fmt, disable_numparse=True))
        if g == "known kernel bug":
            out += [_probe(t, md) for t in tests]
        return out
    if g == "changed by rules":
        rows = [(t.nodeid, t.outcome_a, len(t.moved), ", ".join(dict.fromkeys(
            r for v in t.rules.values() for r in v.split(", ")))) for t in tests]
        out.append(tabulate(rows, headers=("test", "A and B", "moved", "version rules"), tablefmt=fmt,
                            disable_numparse=True) + "\n\n(the moved observables: report.json)")
        return out
    rows = [(t.nodeid, t.outcome_a, t.outcome_b, t.rule) for t in tests]
    heads = ["test", "A", "B", "rule (first line of the failure or skip)"]
    if g == "changed observables":
        rows = [(t.nodeid, t.outcome_a, t.outcome_b, ", ".join(sorted(set(t.rules.values()))) or "-")
                for t in tests]
        heads[-1] = "differing version rules it asked about or whose log lines it shows"
    out.append(tabulate(rows, headers=heads, tablefmt=fmt, disable_numparse=True))
    out += [_moved_table(t, fmt, max_rows) for t in tests if t.moved or t.unsteady]
    return out


def _probe(t: TestDiff, md: bool) -> str:
    side = t.declared_on
    probe = BUG_PROBES.get(t.declared.rule, "tests/host")
    if t.probe is None:
        return (f"{t.nodeid}: the probe ({probe}) did not run in this comparison: "
                f"`pytest {probe} --kernel <{side}'s bzImage>`")
    lines = "\n".join(t.probe.detail) or "(no console lines)"
    title = f"{side}'s probe {probe}: {t.probe.outcome}: {t.probe.rule}"
    return f"**{title}**\n\n```\n{lines}\n```" if md else f"{title}\n" + "\n".join(f"    {x}" for x in t.probe.detail)


def _cut(text: str, width: int = 140) -> str:
    """A cell of the text and Markdown tables (the JSON report keeps every value whole)."""
    text = str(text)
    return text if len(text) <= width else f"{text[:width - 20]}... ({len(text)} chars)"


def _block(text: str, md: bool) -> str:
    return f"```\n{text}\n```" if md else text


# What a maintainer reads first: the failure, mount errnos, kernel log, the daemon's requests,
# then fscache objects, stats and cache files.
ORDER = ("failure", "rule ", "mount ", "kmsg ", "daemon ", "volume ", "cookie ", "stats ", "cache file")


def rank(key: str) -> int:
    return next((i for i, prefix in enumerate(ORDER) if key.startswith(prefix)), len(ORDER))


def _moved_table(t: TestDiff, fmt: str, max_rows: int) -> str:
    rows = sorted([(_cut(k) + (f" (rule {t.rules[k]})" if k in t.rules and not k.startswith("rule ") else ""),
                    _cut(va), _cut(vb)) for k, va, vb in t.moved], key=lambda r: rank(r[0]))
    rows += [(f"{_cut(k)} (varies between runs)", _cut(va), _cut(vb)) for k, va, vb in t.unsteady]
    more = len(rows) - max_rows
    rows = rows[:max_rows]
    runs = f"{len(t.a)} run(s) of A, {len(t.b)} of B"
    text = tabulate(rows, headers=("observable", "A", "B"), tablefmt=fmt, disable_numparse=True)
    if more > 0:
        text += f"\n... {more} more (see the JSON report)"
    title = f"{t.nodeid}: observables that moved ({runs})"
    return f"**{title}**\n\n{text}" if fmt == "github" else f"{title}\n{text}"
