"""The controller's side of a guest that ended mid-test.

pytest-xdist reports "worker 'gwN' crashed while running <test>" and nothing else. The VM
wrapper (tools/vm-python, erofs_domains/host/guard.py) wrote why it ended the VM and the console
lines that show it next to the worker's console log (`<log>.crash`); `explain_crash` adds
them to that report, with the reproduce line and the log's path."""

import time
from pathlib import Path

_used: set[Path] = set()


def wrapper_pid(node) -> int | None:
    """The pid of the worker's tools/vm-python: execnet keeps the subprocess.Popen of a
    popen gateway in `gateway._io.popen` (it has no public accessor)."""
    popen = getattr(getattr(getattr(node, "gateway", None), "_io", None), "popen", None)
    return getattr(popen, "pid", None)


def find_crash_file(console_dir: Path, pid: int | None, since: float, wait: float = 5.0) -> Path | None:
    """The .crash file of the wrapper `pid` written after `since` (epoch seconds); without a
    pid, the newest one not yet used. Waits a little: the wrapper writes it as it exits."""
    pattern = f"*-{pid}.crash" if pid else "*.crash"
    deadline = time.monotonic() + wait
    while True:
        found = [p for p in console_dir.glob(pattern) if p not in _used and p.stat().st_mtime >= since]
        if found:
            best = max(found, key=lambda p: p.stat().st_mtime)
            _used.add(best)
            return best
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def explain_crash(report, console_dir: Path, since: float, reproduce: str, wait: float = 5.0) -> None:
    """Add the VM's own account of its end to xdist's crash report (in place)."""
    crash = find_crash_file(console_dir, wrapper_pid(getattr(report, "node", None)), since, wait)
    if crash:
        text = crash.read_text(errors="replace")
        log = crash.with_suffix(".log")
    else:
        text = f"(the VM wrapper left no account of its end in {console_dir})"
        log = console_dir
    report.longrepr = f"{report.longrepr}\n\n{text.rstrip()}"
    report.sections.append(("reproduce", reproduce))
    report.sections.append(("console log", str(log)))
