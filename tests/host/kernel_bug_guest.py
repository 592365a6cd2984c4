"""Guest side of tests/host/test_kernel_bug.py: runs in a VM of its own (tools/vm-run), never in
the shared test VM. Binds a cache, mounts `fsid=<N x 'k'>,domain_id=<d>` in a child process and
reports what happened on stdout (`RESULT ...` lines); if the mount hangs, it reboots the guest
at once with sysrq (qemu runs with -no-reboot, so the VM ends).

    python tests/host/kernel_bug_guest.py 253
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from erofs_domains.base.proc import WaitTimeout, wait_for  # noqa: E402
from erofs_domains.guest import kmsg  # noqa: E402
from erofs_domains.guest.fscache.cache import CacheFs, wait_withdrawn  # noqa: E402
from erofs_domains.guest.mounts import MS_RDONLY, sys_mount, sys_umount  # noqa: E402
from erofs_domains.programs.ondemand.process import DaemonProcess  # noqa: E402

HANG = 10.0


def main() -> int:
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 253
    fsid, domain = "k" * length, "kbugdom"
    reader = kmsg.KmsgReader()
    cache = CacheFs.create("kbugcache", 64)
    daemon = DaemonProcess(cache_dir=cache.mountpoint, workdir=Path("/tmp/kbug"), tag="kbug")
    daemon.start()
    target = Path("/tmp/kbug-mnt")
    target.mkdir(exist_ok=True)
    print(f"RESULT start fsid={length} bytes domain_id={domain}", flush=True)
    pid = os.fork()
    if pid == 0:
        try:
            sys_mount("none", target, "erofs", MS_RDONLY, f"fsid={fsid},domain_id={domain}")
        except OSError as e:
            os._exit(e.errno or 1)
        os._exit(0)
    def child_status() -> int | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return status if done else None

    try:
        status = wait_for(child_status, what="the mounting child to exit", timeout=HANG, step=0.2,
                          until=lambda st: st is not None)
    except WaitTimeout:
        status = None
    bugs = [str(line) for line in reader.read() if "kernel BUG at" in line.text or "invalid opcode" in line.text]
    for line in bugs:
        print(f"RESULT kmsg {line}", flush=True)
    if status is None:
        print(f"RESULT mount hung for {HANG:.0f} s; rebooting the guest", flush=True)
        # no sync(): it would wait for the s_umount of the superblock the hung mount holds
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("b")
        time.sleep(60)
        return 3
    code = os.waitstatus_to_exitcode(status)
    print(f"RESULT mount exit {code} ({os.strerror(code) if code else 'mounted'})", flush=True)
    if code == 0:
        sys_umount(target)
    daemon.stop()
    wait_withdrawn(daemon.tag)
    cache.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
