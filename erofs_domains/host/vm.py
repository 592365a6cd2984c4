"""Boot a test kernel with virtme-ng and run one command in it, stdio passed through.

The guest sees the host's root over 9p (read-only, virtme-ng's overlays on top), the
suite's cache root and a results directory read-write, and runs the command as root.
The kernel console (and the command's stderr) goes to a log file on the host, read from
vng's stderr through a pipe; stdout and stdin are the command's own, so execnet can speak
through them.
"""

import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from erofs_domains.base import config
from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.layout import REPO
from erofs_domains.base.proc import CmdError, cmd
from erofs_domains.host import cachegc, deps, guard

# Environment the guest needs besides the run configuration (erofs_domains/base/config.py,
# which goes whole: what the controller resolved, the guest uses); vng forwards none.
FORWARDED_ENV = ("PATH", "LANG", "LC_ALL", "TERM", "PYTHONPATH", "PYTHONHASHSEED")
BOOT_BOUND = 600.0  # boot, Python start and collection; TCG on a busy host took ~60 s
POLL = 0.5  # seconds between checks of the guest's bounds


def vng_path() -> str:
    """vng from the venv of this Python or of the controller's (EROFS_TEST_PYTHON: a venv's
    pytest run without activating the venv starts tools/vm-python with the system python3)."""
    for python in (sys.executable, config.current().python):
        exe = Path(python).with_name("vng") if python else None
        if exe and exe.exists():
            return str(exe)
    found = shutil.which("vng")
    if not found:
        raise deps.ToolError(
            "virtme-ng is not installed (no `vng` next to this Python or on PATH). "
            "Use the tox environments (`tox -e vm`), or `pip install virtme-ng` in your venv."
        )
    return found


def vng_env(vng: str) -> dict[str, str]:
    """vng runs virtme-run (and the guest's virtme-init helpers) through PATH: put the venv
    it came from first, so `.tox/vm/bin/pytest ...` works without activating the venv."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(vng).parent), env.get("PATH", os.defpath)])
    return env


KVM_PROBE_TIMEOUT = 20  # the boot to the no-root panic took 1.5 s under TCG here; KVM is faster
KVM_FAILURE_RE = re.compile(r"KVM internal error|emulation failure|failed to set MSR")


def _qemu_kvm_starts() -> bool:
    """qemu can abort on /dev/kvm before the guest runs ("failed to set MSR 0x10a")."""
    try:
        r = cmd(["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-machine", "q35",
                 "-display", "none", "-nodefaults", "-no-reboot", "-monitor", "stdio"],
                input="info status\nquit\n", timeout=30, check=False)
    except CmdError:  # does not start, or hangs
        return False
    return r.returncode == 0 and "failed" not in r.stderr.lower()


def _kernel_boots_under_kvm(kernel: Path) -> bool:
    """Boot the test kernel under KVM with no root filesystem: it must reach its
    "VFS: Unable to mount root fs" panic and qemu must exit (panic=-1, -no-reboot).
    Nested KVM can start qemu and then spin in the host without a line of output, or stop
    at "KVM internal error ... emulation failure" (seen on `lock cmpxchg16b` during boot),
    with qemu paused forever. Either way the guest never runs a test."""
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256M", "-smp", "2",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1", "-display", "none",
            "-nodefaults", "-serial", "stdio", "-no-reboot"]
    try:
        r = cmd(argv, timeout=KVM_PROBE_TIMEOUT, check=False, text=False)  # console bytes may not be UTF-8
    except CmdError:  # does not start, or hangs
        return False
    out = (r.stdout + r.stderr).decode(errors="replace")
    return "Kernel panic" in out and not KVM_FAILURE_RE.search(out)


def _kvm_stamp() -> tuple[Path, str]:
    """Where the KVM verdict is kept, and what it is valid for (host kernel, qemu)."""
    return cache_root() / "kvm-probe", f"v2 {os.uname().release} {shutil.which('qemu-system-x86_64')}"


@functools.cache
def kvm_usable(kernel: Path | None = None) -> bool:
    """Whether to boot with KVM: EROFS_TEST_ACCEL=kvm|tcg decides; otherwise probe, and
    remember the verdict per (host kernel, qemu) once a test kernel really booted."""
    if config.current().accel in ("tcg", "kvm"):
        return config.current().accel == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    stamp, key = _kvm_stamp()
    if stamp.exists():
        saved_key, _, verdict = stamp.read_text().rpartition(" ")
        if saved_key == key:
            return verdict == "yes"
    if not _qemu_kvm_starts():
        ok = False
    elif kernel is None or not Path(kernel).is_file():
        return True  # not decided for good until a kernel boots
    else:
        ok = _kernel_boots_under_kvm(Path(kernel))
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{key} {'yes' if ok else 'no'}")
    return ok


def forget_kvm(reason: str) -> None:
    """KVM failed while a guest ran: later VMs of this host use TCG."""
    stamp, key = _kvm_stamp()
    stamp.write_text(f"{key} no")
    kvm_usable.cache_clear()
    sys.stderr.write(f"vm: KVM failed in the guest ({reason.strip()}); later VMs use TCG "
                     "(EROFS_TEST_ACCEL=kvm forces KVM)\n")


@dataclass
class GuestRun:
    kernel: Path
    command: list[str]
    rwdirs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    memory: str = "2G"
    cpus: int = 2
    console_log: Path | None = None
    cwd: Path = REPO
    interactive: bool = False
    state_file: Path | None = None  # the running test and its bound, written by the guest
    lifetime: float = field(default_factory=lambda: config.current().vm_lifetime)  # 0 or less: no bound

    def vng_argv(self) -> list[str]:
        argv = [vng_path(), "--run", str(self.kernel), "--force-9p", "--user", "root",
                "--memory", self.memory, "--cpus", str(self.cpus), "--cwd", str(self.cwd)]
        if not kvm_usable(Path(self.kernel)):
            argv.append("--disable-kvm")
        # The guest's root is the host's / over 9p, read-only: let the guest cache it, or
        # every Python import stats and reads through 9p (3x slower startup under TCG).
        argv += ["--append", "rootflags=version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose"]
        for d in self.rwdirs:
            argv += ["--rwdir", str(d)]
        if self.interactive:
            return argv
        argv.append("--verbose")  # kernel console on stderr, which we log
        # The command goes through the kernel command line (2048 bytes on x86, the rest is
        # cut off, root= included): pass environment and arguments in a script instead.
        argv += ["--", "/bin/sh", str(self.launcher())]
        return argv

    def launcher(self) -> Path:
        d = cache_root() / "launch"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{os.getpid()}-{time.monotonic_ns()}.sh"
        lines = ["#!/bin/sh"] + [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        lines.append(f"exec {shlex.join(self.command)}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def run(self) -> int:
        """Run with stdin/stdout inherited; stderr (console) copied to the log file.

        The guest is ended early for the reasons in guard.py; why it ended, with the console
        lines that show it, goes to stderr and to `crash_report_path(console_log)`."""
        deps.check(deps.VM_RUN, "boot the test kernel")
        if not Path(self.kernel).is_file():
            raise deps.ToolError(f"kernel image {self.kernel} does not exist; build one with tools/build-kernel")
        argv = self.vng_argv()
        if self.interactive:
            return subprocess.call(argv, env=vng_env(argv[0]))
        lifetime = guard.Lifetime(time.monotonic(), self.lifetime)
        cachegc.mark_used(Path(self.kernel))
        if self.state_file:
            guard.write_state(self.state_file, "(boot and collection)", BOOT_BOUND)
        scan = guard.ConsoleScan()
        clock = guard.TestClock(Path(self.state_file)) if self.state_file else None
        lock = threading.Lock()
        kvm_failure: list[str] = []
        log = open(self.console_log, "w") if self.console_log else None  # noqa: SIM115
        proc = keeper = None
        ended = None

        def pump():
            for raw in proc.stderr:
                line = raw.decode(errors="replace")
                if log:
                    log.write(line)
                    log.flush()
                with lock:
                    scan.feed(line, time.monotonic())
                    if KVM_FAILURE_RE.search(line) and not kvm_failure:
                        # qemu pauses the guest for good after a KVM internal error.
                        kvm_failure.extend(list(scan.tail)[-20:])
                        guard.kill_group(proc.pid)

        # From here on a SIGTERM, SIGHUP or SIGINT ends the VM before this process exits. SIGINT
        # gets a handler too: a process started in the background of a non-interactive shell
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
        old = {sig: signal.signal(sig, guard.raise_ended) for sig in guard.HELD}
        try:
            # Signals wait until `proc` and `keeper` are set: a stop between the fork and
            # the assignment would leave the VM unknown here and unguarded.
            with guard.signals_held():
                # Its own process group, so that qemu goes with vng when the guest must be stopped.
                proc = subprocess.Popen(argv, stdin=sys.stdin, stdout=sys.stdout, stderr=subprocess.PIPE,
                                        start_new_session=True, preexec_fn=guard.release_signals,
                                        env=vng_env(argv[0]))
                keeper = guard.Guard(proc.pid)
            t = threading.Thread(target=pump, daemon=True)
            t.start()
            while True:
                try:
                    rc = proc.wait(timeout=POLL)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                with lock:
                    crashed = scan.due(now)
                why = (f"the guest kernel crashed ({scan.headline()}); the VM was ended "
                       f"{now - scan.first_at:.1f} s after that line" if crashed else
                       (clock and clock.overdue(now)) or lifetime.over(now))
                if why and not ended:
                    ended = why
                    guard.kill_group(proc.pid)
                    _say(f"vm: ending the VM: {why}\n")
        except BaseException as e:
            if proc:
                guard.kill_group(proc.pid)
                proc.wait()
                self._explain(f"the VM wrapper was stopped ({type(e).__name__} {e})", scan, lock, echo=False)
            raise
        finally:
            if keeper:
                keeper.done()
            self._restore(old)
        t.join(5)
        if log:
            log.close()
        if kvm_failure:
            forget_kvm(kvm_failure[-1])
            self._explain("KVM stopped the guest", scan, lock, kvm_failure)
            return rc if rc else 1
        if scan.crashed:
            self._explain(ended or f"the guest kernel crashed ({scan.headline()})", scan, lock)
        elif ended or rc:
            self._explain(ended or f"the VM ended with status {rc}", scan, lock)
        return (rc or 1) if ended else rc

    @staticmethod
    def _restore(handlers: dict) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    def _explain(self, why: str, scan: guard.ConsoleScan, lock: threading.Lock,
                 lines: list[str] | None = None, echo: bool = True) -> None:
        """Why the guest ended, and the console lines that show it: on stderr (only the
        reason unless `echo`) and, for the controller's crash report, next to the console log."""
        with lock:
            shown = lines or scan.lines or list(scan.tail)
            what = "console lines around it" if (lines or scan.lines) else "last console lines"
        where = f" (full console log: {self.console_log})" if self.console_log else ""
        text = f"vm: {why}{where}; {what}:\n" + "".join(shown)
        _say(text if echo else f"vm: {why}; ended the VM{where}\n")
        if self.console_log:
            guard.crash_report_path(Path(self.console_log)).write_text(text)


def _say(text: str) -> None:
    """To stderr, which may be a pipe to a controller that is gone."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def guest_env(run: config.RunConfig) -> dict[str, str]:
    """The guest's environment: the run configuration `run` and `FORWARDED_ENV` (the locale,
    the search paths) of this process."""
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV}
    env.update(run.environment())
    return env


def guest(kernel: Path, command: list[str], *, stem: str, console_log: Path | None = None,
          state_file: bool = False, interactive: bool = False) -> GuestRun:
    """A guest on `kernel` running `command` (tools/vm-python's workers, tools/vm-run), with the
    run configuration handed in whole: the results and cache folders writable, the console in
    <results>/console/<stem>-*.log, and (`state_file`) the file the guest names its running
    test in, beside the console log."""
    run = config.current()
    run.results.mkdir(parents=True, exist_ok=True)
    console_log = console_log or timestamped_log(run.results, stem)
    state = console_log.with_suffix(".state") if state_file else None
    return GuestRun(kernel=kernel, command=command, interactive=interactive, rwdirs=[cache_root(), run.results],
                    env=guest_env(run.replace(cache=cache_root(), in_vm=True, kernel=kernel, vm_state=state)),
                    console_log=console_log, state_file=state)


def default_kernel() -> Path | None:
    return config.current().kernel


def timestamped_log(results: Path, stem: str) -> Path:
    d = results / "console"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{stem}-{time.strftime('%H%M%S')}-{os.getpid()}.log"
