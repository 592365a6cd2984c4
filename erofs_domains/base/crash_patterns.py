"""What a kernel log line says went wrong: one list, read by the kernel-log check after each test
(erofs_domains/guest/kmsg.py), the VM guard that ends a dying guest (erofs_domains/host/guard.py)
and the known-bug probes (tests/host)."""

import re

# Reports the kernel-log check fails a test for, by kind (the kind names the failure).
REPORTS = {
    "BUG": re.compile(r"\bBUG[: ]|kernel BUG at"),
    "WARNING": re.compile(r"\bWARNING:"),
    "Oops": re.compile(r"\bOops\b|general protection fault|invalid opcode"),
    "KASAN": re.compile(r"KASAN"),
    "refcount": re.compile(r"refcount_t: "),
    "hung task": re.compile(r"blocked for more than \d+ seconds"),
    "list corruption": re.compile(r"list_(add|del) corruption"),
    "lockdep": re.compile(r"possible (recursive|circular) locking|inconsistent lock state"),
}

# The first line of an oops (die(), do_trap(), page_fault_oops(), panic()): the guest will not
# go on. Not KASAN or KFENCE reports, nor WARNs: the kernel goes on after them, and the test's
# kernel-log check fails the test with the lines. Not soft-lockup reports either: a TCG guest on
# a busy host gets them spuriously; a real lockup outlives the test's bound.
CRASH = re.compile(
    r"kernel BUG at|Oops[:\s]|general protection fault|Kernel panic|Unable to handle kernel"
    r"|BUG: (?:unable to handle|kernel NULL pointer)"
)
# The last line of the report: end_trace() / panic() print it.
REPORT_END = re.compile(r"---\[ end (?:trace|Kernel panic)")
# A crash or a memory-safety report: what a known-bug probe counts as the bug showing.
CRASH_OR_SANITIZER = re.compile(f"{CRASH.pattern}|KASAN|KFENCE")
