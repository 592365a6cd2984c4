"""What a test may leave behind, and the check that nothing was.

Leaked state is a bug of the suite or of the kernel: an erofs mount, a loop device, a bound
cache, an on-demand daemon, or fscache volumes and cookies that outlive every mount.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from erofs_domains.base.proc import WaitTimeout, wait_for
from erofs_domains.guest import mounts
from erofs_domains.guest.observe import procfs


def loop_devices(sys_block: Path = Path("/sys/block")) -> set[str]:
    """Bound loop devices as "/dev/loopN -> backing file".

    A loop device cleared on its last close (LO_FLAGS_AUTOCLEAR, as mount sets it) loses its
    sysfs `loop/` directory at any moment, between the listing and the read included
    (loop_sysfs_exit() from __loop_clr_fd()): gone means unbound, not an error.
    """
    out = set()
    for d in sys_block.glob("loop*"):
        try:
            backing = (d / "loop" / "backing_file").read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        out.add(f"/dev/{d.name} -> {backing}")
    return out


def daemon_processes() -> set[str]:
    out = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = (p / "comm").read_text().strip()
        except OSError:
            continue
        # Daemons forked from the fork server carry its command line, but their own comm.
        if comm == "erofs-ondemand" or (
            ("erofs_domains.programs.ondemand" in cmd or "ondemand-daemon" in cmd) and "forkserver" not in cmd
        ):
            out.add(f"pid {p.name} ({comm}): {cmd.strip()[:120]}")
    return out


@dataclass(frozen=True)
class SystemState:
    erofs_mounts: frozenset
    loops: frozenset
    live_caches: frozenset
    volumes: frozenset
    cookies: frozenset
    daemons: frozenset

    @classmethod
    def capture(cls) -> "SystemState":
        have_proc = os.path.exists("/proc/fs/fscache/volumes")
        vols = procfs.read_volumes() if have_proc else []
        erofs_vols = {v.debug_id: v.key for v in vols if v.key.startswith("erofs,")}
        cookies = procfs.read_cookies() if have_proc else []
        return cls(
            erofs_mounts=frozenset(mounts.erofs_mounts()),
            loops=frozenset(loop_devices()),
            live_caches=frozenset(f"{c.name} state {c.state}" for c in (procfs.read_caches() if have_proc else [])
                                  if c.state != "-"),
            volumes=frozenset(erofs_vols.values()),
            cookies=frozenset(f"{erofs_vols[c.volume_id]} / {c.key_text} (state {c.state})"
                              for c in cookies if c.volume_id in erofs_vols),
            daemons=frozenset(daemon_processes()),
        )

    def leaked_since(self, before: "SystemState") -> dict[str, set]:
        out = {}
        for name in self.__dataclass_fields__:
            extra = set(getattr(self, name)) - set(getattr(before, name))
            if extra:
                out[name] = extra
        return out


def wait_for_no_leaks(before: SystemState, timeout: float = 5.0) -> dict[str, set]:
    """Relinquished cookies and withdrawn volumes go away asynchronously: poll a little."""
    try:
        return wait_for(lambda: SystemState.capture().leaked_since(before), what="no state left behind",
                        timeout=timeout, step=0.1, until=lambda leaked: not leaked)
    except WaitTimeout as e:
        return e.last


def render(leaked: dict[str, set]) -> str:
    rows = [(kind, item) for kind, items in sorted(leaked.items()) for item in sorted(items)]
    return "state left behind after the test:\n" + tabulate(rows, headers=["kind", "what"])
