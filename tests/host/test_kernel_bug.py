"""Known kernel bugs that wedge the guest: each runs in a VM of its own, from the controller.

    pytest tests/host --kernel /path/to/bzImage      # or EROFS_TEST_KERNEL=...

A cookie key of 253..255 bytes passes fscache (<= 255) but hits
`BUG_ON(keylen > NAME_MAX - 3)` in cachefiles_cook_key() (fs/cachefiles/key.c:47): in a shared
domain the fsid is such a key (docs/domains.md#key-lengths). The fscache worker oopses and the mount never
returns, so this must never run in the shared test VM: tools/vm-run boots a throwaway guest,
tests/host/kernel_bug_guest.py mounts in a child process and reboots the guest (sysrq) when the
mount hangs. While the bug is there the test reports xfail ("known kernel bug"), never a
failure; on a fixed kernel it must mount or fail cleanly.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUG_LINE = re.compile(r"kernel BUG at fs/cachefiles/key\.c:47")
VM_TIMEOUT = 300


def run_guest(kernel: Path, console: Path, *args: str) -> tuple[int | None, str]:
    cmd = [sys.executable, str(REPO / "tools" / "vm-run"), "--kernel", str(kernel), "--console-log", str(console),
           "--", sys.executable, "tests/host/kernel_bug_guest.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=VM_TIMEOUT)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


@pytest.mark.crashes_kernel
@pytest.mark.parametrize("length", [253])
def test_domain_fsid_253_bytes_hits_cachefiles_bug(test_kernel, length, tmp_path):
    results = Path(os.environ.get("EROFS_TEST_RESULTS") or REPO / "results") / "console"
    results.mkdir(parents=True, exist_ok=True)
    console = results / f"kernel-bug-{length}-{time.strftime('%H%M%S')}.log"
    rc, out = run_guest(test_kernel, console, str(length))
    log = console.read_text(errors="replace") if console.exists() else ""
    lines = [x for x in (log + "\n" + out).splitlines() if "RESULT" in x or BUG_LINE.search(x)]
    summary = "\n".join(lines[-20:]) or "(no RESULT lines)"
    if BUG_LINE.search(log) or BUG_LINE.search(out):
        pytest.xfail(f"known kernel bug: fsid of {length} bytes in a domain -> BUG_ON in cachefiles_cook_key() "
                     f"(fs/cachefiles/key.c:47), mount hangs; console {console}\n{summary}")
    assert rc is not None, f"the guest did not end within {VM_TIMEOUT} s and showed no BUG line\n{summary}"
    m = re.search(r"RESULT mount exit (\d+)", out)
    assert m, f"the guest script did not report the mount (vm-run exit {rc}); console {console}\n{summary}"
    assert "hung" not in out, f"the mount hung without the known BUG line; console {console}\n{summary}"
