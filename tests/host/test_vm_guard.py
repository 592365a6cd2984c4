"""Self-check of the VM wrapper on a real guest: a console that shows a kernel BUG ends the
VM within seconds, with the BUG lines, even though the guest would go on for ten minutes
(erofs_domains/host/guard.py; the unit tests check the same with a fake qemu).

The guest writes the BUG's first and last lines to /dev/kmsg itself, as printk would: the
kernel under test is not broken for this."""

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOUND = 240  # boot under TCG on a busy host, then the scan's settle time (3 s)
GUEST = ("echo '<2>kernel BUG at selfcheck/vm_guard.c:1!' > /dev/kmsg; "
         "echo '<2>---[ end trace 0000000000000000 ]---' > /dev/kmsg; sleep 600")


def test_a_bug_on_the_console_ends_the_vm_with_its_lines(test_kernel, tmp_path):
    console = tmp_path / "console.log"
    start = time.monotonic()
    r = subprocess.run([sys.executable, str(REPO / "tools" / "vm-run"), "--kernel", str(test_kernel),
                        "--console-log", str(console), "--", "/bin/sh", "-c", GUEST],
                       cwd=REPO, capture_output=True, text=True, timeout=BOUND + 60)
    took = time.monotonic() - start
    log = console.read_text(errors="replace") if console.exists() else ""
    assert "kernel BUG at selfcheck/vm_guard.c:1!" in log, \
        f"the guest's line never reached the console log {console}:\n{log[-3000:]}\n{r.stderr[-2000:]}"
    assert r.returncode != 0 and took < BOUND, \
        f"vm-run took {took:.0f} s (exit {r.returncode}) for a guest whose console showed a BUG\n{r.stderr[-3000:]}"
    crash = console.with_suffix(".crash").read_text()
    assert "the guest kernel crashed (" in crash and "selfcheck/vm_guard.c:1!" in crash, crash
    assert "selfcheck/vm_guard.c:1!" in r.stderr
