"""Known kernel bugs that wedge the guest: each runs in a VM of its own, from the controller.

    pytest tests/host --kernel /path/to/bzImage      # or EROFS_TEST_KERNEL=..., or --kernel-version 6.1

Each probe runs on the kernels its rule (erofs_domains/guest/kernel_features.py, bug_*) names, and is a declared skip
elsewhere; the shared-VM tests that would hit the bug skip on those kernels (require.not_bug()).

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

from erofs_domains.base import config, crash_patterns

REPO = Path(__file__).resolve().parents[2]
BUG_LINE = re.compile(r"kernel BUG at fs/cachefiles/key\.c:47")
BUSY_LINE = re.compile(r"VFS: Busy inodes after unmount of erofs")
OOPS_LINE = crash_patterns.CRASH_OR_SANITIZER
NULL_DEREF_LINE = re.compile(r"NULL pointer dereference")
CALL_TRACE_LINE = re.compile(r"erofs_\w+\+0x")
PRIMARY_COOKIE_SCRIPT = REPO / "docs" / "known-bugs" / "erofs-6.1-shared-primary-cookie.sh"
REMOUNT_SHARE_SCRIPT = REPO / "docs" / "known-bugs" / "erofs-7.2-remount-inode-share.sh"
VM_TIMEOUT = 300


def requires_bug(kernel: Path, rule: str) -> None:
    """Declared skip unless the kernel's release is in the range of known-bug rule `rule`."""
    from erofs_domains.guest.kernel_features import RULES, parse_release
    from erofs_domains.host.kernel_build import bzimage_release

    release = bzimage_release(kernel)
    if release is None:
        return  # unknown release: probe it
    if not RULES[rule].in_range(parse_release(release)):
        pytest.skip(f"rule {rule} ({RULES[rule].kernels()}) does not apply to kernel {release}")


def console_path(name: str) -> Path:
    results = config.current().results / "console"
    results.mkdir(parents=True, exist_ok=True)
    return results / f"{name}-{time.strftime('%H%M%S')}.log"


def run_guest(kernel: Path, console: Path, *args: str) -> tuple[int | None, str]:
    return run_in_guest(kernel, console, sys.executable, "tests/host/kernel_bug_guest.py", *args)


def run_in_guest(kernel: Path, console: Path, *command: str) -> tuple[int | None, str]:
    cmd = [sys.executable, str(REPO / "tools" / "vm-run"), "--kernel", str(kernel), "--console-log", str(console),
           "--", *command]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=VM_TIMEOUT)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def guest_log(console: Path, out: str) -> str:
    """The guest's console log and what vm-run printed, as one text."""
    return (console.read_text(errors="replace") if console.exists() else "") + "\n" + out


def summarize(log: str, *patterns: re.Pattern) -> str:
    """The reproducer's RESULT lines and the kernel lines matching `patterns`, last 20."""
    lines = [x for x in log.splitlines() if "RESULT" in x or any(p.search(x) for p in patterns)]
    return "\n".join(lines[-20:]) or "(no RESULT lines)"


@pytest.mark.crashes_kernel
@pytest.mark.parametrize("length", [253])
def test_domain_fsid_253_bytes_hits_cachefiles_bug(test_kernel, length, tmp_path):
    requires_bug(test_kernel, "bug_cachefiles_key47")
    console = console_path(f"kernel-bug-{length}")
    rc, out = run_guest(test_kernel, console, str(length))
    log = guest_log(console, out)
    summary = summarize(log, BUG_LINE)
    if BUG_LINE.search(log):
        pytest.xfail(f"known kernel bug: fsid of {length} bytes in a domain -> BUG_ON in cachefiles_cook_key() "
                     f"(fs/cachefiles/key.c:47), mount hangs; console {console}\n{summary}")
    assert rc is not None, f"the guest did not end within {VM_TIMEOUT} s and showed no BUG line\n{summary}"
    m = re.search(r"RESULT mount exit (\d+)", out)
    assert m, f"the guest script did not report the mount (vm-run exit {rc}); console {console}\n{summary}"
    assert "hung" not in out, f"the mount hung without the known BUG line; console {console}\n{summary}"


@pytest.mark.crashes_kernel
def test_device_naming_a_member_fsid_frees_inode_of_live_cookie(test_kernel):
    """6.1.y: member B of domain D says `device=L` where L is member A's fsid; when A unmounts,
    the shared cookie's anonymous inode still belongs to A's superblock ("VFS: Busy inodes after
    unmount of erofs"), and B's unmount iput()s it: general protection fault, the guest dies.
    Runs docs/known-bugs/erofs-6.1-shared-primary-cookie.sh in a VM of its own."""
    requires_bug(test_kernel, "bug_shared_primary_inode")
    console = console_path("kernel-bug-primary-cookie")
    rc, out = run_in_guest(test_kernel, console, "bash", str(PRIMARY_COOKIE_SCRIPT))
    log = guest_log(console, out)
    summary = summarize(log, BUSY_LINE, OOPS_LINE)
    assert "RESULT both members mounted" in log, (
        f"the reproducer did not get as far as the two mounts (vm-run exit {rc}); console {console}\n{summary}")
    if BUSY_LINE.search(log) or OOPS_LINE.search(log):
        pytest.xfail(f"known kernel bug (rule bug_shared_primary_inode): the shared primary cookie's inode "
                     f"outlives its superblock; console {console}\n{summary}")
    assert "RESULT both unmounted" in log, (
        f"no busy inodes and no oops, but the reproducer did not finish (vm-run exit {rc}); console {console}\n"
        f"{summary}")
    pytest.fail(f"rule bug_shared_primary_inode says this kernel has the bug, but the reproducer ran clean: "
                f"narrow the rule's range in erofs_domains/guest/kernel_features.py\n{summary}", pytrace=False)


@pytest.mark.crashes_kernel
def test_remount_turning_inode_share_on_without_a_domain(test_kernel):
    """7.0+: a mount made without inode_share/domain_id, remounted `-o remount,inode_share`:
    erofs_fc_reconfigure() takes INODE_SHARE while sbi->domain_id stays NULL. From 7.2.7 the next
    file lookup oopses in strlen() from erofs_xattr_fill_inode_fingerprint() (the reader is
    killed, the guest lives on tainted: a VM of its own); before, files share with no domain.
    Runs docs/known-bugs/erofs-7.2-remount-inode-share.sh."""
    requires_bug(test_kernel, "bug_remount_inode_share")
    console = console_path("kernel-bug-remount-inode-share")
    rc, out = run_in_guest(test_kernel, console, "bash", str(REMOUNT_SHARE_SCRIPT))
    log = guest_log(console, out)
    summary = summarize(log, OOPS_LINE, NULL_DEREF_LINE, CALL_TRACE_LINE)
    if m := re.search(r"RESULT no page-cache sharing in this kernel: (.*)", log):
        pytest.skip(f"the kernel does not share page cache (CONFIG_EROFS_FS_PAGE_CACHE_SHARE): {m.group(1)}")
    assert "RESULT plain mount" in log, (
        f"the reproducer did not get as far as the plain mount (vm-run exit {rc}); console {console}\n{summary}")
    if OOPS_LINE.search(log) or NULL_DEREF_LINE.search(log):
        pytest.xfail(f"known kernel bug (rule bug_remount_inode_share): inode_share turned on by a remount "
                     f"without a domain oopses on the next lookup; console {console}\n{summary}")
    if re.search(r"RESULT remount exit 0: \S*\binode_share\b", log):
        # Before `erofs: delimit inode_share cache key components` (7.2.7) the key tolerated a NULL
        # domain: no oops, the files share under a key without a domain.
        pytest.xfail(f"known kernel bug (rule bug_remount_inode_share): the remount turned inode_share on for a "
                     f"mount without domain_id (sharing outside any domain); console {console}\n{summary}")
    assert "RESULT read after the remount: ok" in log and "RESULT unmounted" in log, (
        f"no oops, but the file did not read back or the mount did not come down (vm-run exit {rc}); "
        f"console {console}\n{summary}")
    pytest.fail(f"rule bug_remount_inode_share says this kernel has the bug, but the reproducer ran clean: "
                f"narrow the rule's range in erofs_domains/guest/kernel_features.py\n{summary}", pytrace=False)
