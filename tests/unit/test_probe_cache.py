"""features_probe.probe_guest: the features probe boots a VM once per (kernel image, probe code,
mkfs), and a changed kernel image is probed again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from erofs_domains.host import deps, features_probe


@pytest.fixture
def boots(tmp_path, monkeypatch):
    """Count the probe VMs; each answers with the kernel image's first bytes as its release."""
    monkeypatch.setenv("EROFS_TEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MKFS_EROFS", raising=False)
    calls = []

    def fake_cmd(cmd, **kw):
        calls.append(cmd)
        kernel = Path(cmd[cmd.index("--kernel") + 1])
        answer = {"table": [["kernel release", kernel.read_text()]]}
        return subprocess.CompletedProcess(cmd, 0, "booting\n" + json.dumps(answer) + "\n", "")

    monkeypatch.setattr(features_probe, "cmd", fake_cmd)
    return calls


def test_the_same_kernel_is_probed_once(tmp_path, boots):
    kernel = tmp_path / "bzImage"
    kernel.write_text("6.12.117")
    first = features_probe.probe_guest(kernel)
    again = features_probe.probe_guest(kernel)
    assert len(boots) == 1
    assert again["table"] == first["table"] == [["kernel release", "6.12.117"]]
    assert "cached" not in first and again["cached"].endswith(".json")


def test_a_rebuilt_kernel_at_the_same_path_is_probed_again(tmp_path, boots):
    kernel = tmp_path / "bzImage"
    kernel.write_text("6.12.117")
    features_probe.probe_guest(kernel)
    kernel.write_text("6.12.118")
    assert features_probe.probe_guest(kernel)["table"] == [["kernel release", "6.12.118"]]
    assert len(boots) == 2


def test_a_kernel_that_does_not_boot_is_not_remembered(tmp_path, monkeypatch, boots):
    kernel = tmp_path / "bzImage"
    kernel.write_text("broken")
    monkeypatch.setattr(features_probe, "cmd",
                        lambda cmd, **kw: boots.append(cmd) or subprocess.CompletedProcess(cmd, 1, "", "panic"))
    for _ in range(2):
        with pytest.raises(deps.ToolError, match="did not boot"):
            features_probe.probe_guest(kernel)
    assert len(boots) == 2
