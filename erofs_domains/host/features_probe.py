"""What the test kernel can do, read in a VM before the workers start (also proves the kernel
boots): `python -m erofs_domains.guest.kernel_features` in a guest of its own. The answer is
kept per (kernel image, probe code, mkfs), so the next run of the same kernel starts its
workers without this extra boot (~10 s under TCG)."""

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

from erofs_domains.base import config, erofs_tools
from erofs_domains.base.cache_dir import cache_root
from erofs_domains.base.layout import REPO, TOOLS
from erofs_domains.base.proc import cmd
from erofs_domains.guest import kernel_features, kernel_probes
from erofs_domains.host import deps

PROBE_CODE = (Path(kernel_features.__file__), Path(kernel_probes.__file__))


def probe_key(kernel: Path, mkfs: str | None) -> str:
    """What a probe's answer depends on: the kernel image, the probe's code, the mkfs binary."""
    h = hashlib.sha256(Path(kernel).read_bytes())
    for code in PROBE_CODE:
        h.update(code.read_bytes())
    h.update(b"probes" if config.current().feature_probes else b"ranges only")
    if mkfs and os.path.exists(mkfs):
        h.update(f"{os.path.realpath(mkfs)} {erofs_tools.identity(mkfs)}".encode())
    return h.hexdigest()[:24]


def probe_guest(kernel: Path) -> dict | None:
    """The guest's features table (None when the run configuration says not to probe:
    tools/compare-kernels and tools/bisect save the boot). Raises deps.ToolError when the
    kernel does not boot or run Python."""
    run = config.current()
    if not run.probe:
        return None
    saved = cache_root() / "probes" / f"{probe_key(kernel, run.mkfs)}.json"
    if saved.exists():
        guest = json.loads(saved.read_text())
        guest["cached"] = str(saved)
        return guest
    argv = [sys.executable, str(TOOLS / "vm-run"), "--kernel", str(kernel), "--",
            sys.executable, "-m", "erofs_domains.guest.kernel_features", run.mkfs or ""]
    r = cmd(argv, check=False, cwd=REPO, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            guest = json.loads(line)
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(guest))
            tmp.replace(saved)
            return guest
    raise deps.ToolError(
        f"the test kernel {kernel} did not boot or run Python (exit {r.returncode}).\n"
        f"command: {shlex.join(argv)}\n{r.stderr[-3000:]}"
    )
