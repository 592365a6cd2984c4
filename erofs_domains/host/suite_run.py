"""Run the suite on a given bzImage as a child pytest (tools/compare-kernels, tools/bisect).

Each run gets its own results directory: JUnit XML, observables.jsonl (fixtures/record.py),
pytest's output, the per-test artifacts and the VM consoles.  Runs of two kernels may go at
the same time: they share only the image cache (built atomically) and the features-probe
cache (keyed by kernel image).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from erofs_domains.base.layout import REPO

DEFAULT_TESTS = "tests/fscache"


def has_test_path(args: list[str]) -> bool:
    """Does a pytest argument list name tests (a path or node id) rather than only options?"""
    skip_next = False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if a in ("-k", "-m", "-p", "-o", "--deselect", "--ignore", "-c", "--rootdir", "--tx", "-n"):
            skip_next = True
            continue
        if not a.startswith("-") and (REPO / a.split("::")[0]).exists():
            return True
    return False


def pytest_command(image: Path, outdir: Path, args: list[str], *, vms: int = 1,
                   python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--dist", "load",
           "--tx", f"{vms}*popen//python=tools/vm-python", "--kernel", str(image),
           "--results", str(outdir), f"--junitxml={outdir / 'junit.xml'}", "-rfE"]
    return cmd + list(args) + ([] if has_test_path(args) else [DEFAULT_TESTS])


def collect(args: list[str], python: str | None = None) -> tuple[list[str], str]:
    """The node ids `pytest --collect-only` finds for these arguments (nothing is built or booted
    for it: conftest.py), and pytest's own word when it finds none."""
    argv = [python or sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), f"--rootdir={REPO}",
            "-p", "no:cacheprovider", "--collect-only", "-q", *args]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    ids = [line for line in r.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    lines = [line.strip() for line in (r.stdout + "\n" + r.stderr).splitlines() if line.strip()]
    why = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else f"exit {r.returncode}")
    return (ids if r.returncode == 0 else []), why


def check_test_id(test_id: str, pytest_args: list[str], python: str | None = None) -> str:
    """The one test `test_id` names, collected; raises validate.BadInput when it names none or several."""
    from erofs_domains.host.validate import BadInput

    ids, why = collect([*pytest_args, test_id], python)
    where = test_id.split("::")[0] if (REPO / test_id.split("::")[0]).exists() else DEFAULT_TESTS
    listing = f"`pytest --collect-only -q {where}` lists them"
    if len(ids) == 1:
        return ids[0]
    if len(ids) > 1:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise BadInput(f"test id {test_id} names {len(ids)} tests ({shown}); give one ({listing})")
    raise BadInput(f"test id {test_id} is not a test of the suite ({why}); give a node id as {listing}")


def check_selection(pytest_args: list[str], python: str | None = None) -> int:
    """How many tests the pytest arguments of a run select (their default path added as the run
    adds it); raises validate.BadInput when they select none or pytest refuses them."""
    from erofs_domains.host.validate import BadInput

    args = list(pytest_args) + ([] if has_test_path(pytest_args) else [DEFAULT_TESTS])
    ids, why = collect(args, python)
    if not ids:
        raise BadInput(f"the pytest arguments {shlex.join(pytest_args) or '(none)'} select no test ({why}); "
                       f"`pytest --collect-only -q {shlex.join(args)}` shows what they select")
    return len(ids)


@dataclass
class SuiteRun:
    label: str
    image: Path
    outdir: Path
    cmd: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None

    @property
    def observables(self) -> Path:
        return self.outdir / "observables.jsonl"

    @property
    def log(self) -> Path:
        return self.outdir / "pytest.log"

    def start(self, env: dict[str, str]) -> SuiteRun:
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.observables.unlink(missing_ok=True)
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            # tools/vm-python finds vng next to the venv's Python or on PATH, as under tox
            path = f"{Path(self.cmd[0]).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, **env, PATH=path,
                                                  EROFS_TEST_RESULTS=str(self.outdir)))
        return self

    def wait(self) -> int:
        self.returncode = self.proc.wait()
        self.seconds = time.monotonic() - self.started
        return self.returncode

    def summary(self) -> str:
        """pytest's last line ("3 failed, 10 passed in 80.1s"), or the log's tail."""
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()] if self.log.exists() else []
        for line in reversed(lines):
            if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b.* in [\d.]+s", line):
                return line.strip("= ")
        return "\n".join(lines[-15:])

    def broken(self) -> str | None:
        """Why this run has no results to compare (pytest usage or internal error, no file)."""
        if self.returncode in (2, 3, 4) or not self.observables.exists():
            return (f"{self.label}: pytest exited {self.returncode} without results "
                    f"(log {self.log}):\n{self.summary()}")
        return None


@contextlib.contextmanager
def vm_lock(path: Path | None, log=print):
    """Hold an flock on `path` while VMs run (a machine shared with other runs); no-op for None."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        start = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        if time.monotonic() - start > 1:
            log(f"waited {time.monotonic() - start:.0f} s for {path}")
        yield


def run_parallel(runs: list[SuiteRun], env: dict[str, str], log=print, lock: Path | None = None) -> None:
    """Start every run, then wait for all (each side boots its own VMs)."""
    with vm_lock(lock, log):
        for r in runs:
            log(f"{r.label}: {' '.join(r.cmd[1:])}")
            r.start(env)
        for r in runs:
            r.wait()
            log(f"{r.label}: {r.summary().splitlines()[-1] if r.summary() else ''} ({r.seconds:.0f} s, log {r.log})")
