"""erofs_domains/host/vm.py: choosing KVM or TCG, and a guest that KVM stops mid-run.

Nested hosts fail KVM in three ways (seen here): qemu aborts at once, qemu spins with no
output, or the guest stops with "KVM internal error ... emulation failure" and qemu pauses
it for good. The last one hung a whole CI run before the runner watched for it.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from erofs_domains.base import config
from erofs_domains.host import vm


@pytest.fixture
def probe_env(tmp_path, monkeypatch):
    """An empty cache root, a /dev/kvm that looks usable, no EROFS_TEST_ACCEL."""
    monkeypatch.setenv("EROFS_TEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EROFS_TEST_ACCEL", raising=False)
    real_access = os.access
    monkeypatch.setattr(vm.os, "access", lambda p, m: True if p == "/dev/kvm" else real_access(p, m))
    vm.kvm_usable.cache_clear()
    yield tmp_path
    vm.kvm_usable.cache_clear()


def test_accel_env_decides_without_probing(probe_env, monkeypatch):
    monkeypatch.setattr(vm, "_qemu_kvm_starts", lambda: pytest.fail("probed despite EROFS_TEST_ACCEL"))
    monkeypatch.setenv("EROFS_TEST_ACCEL", "tcg")
    assert vm.kvm_usable(None) is False
    vm.kvm_usable.cache_clear()
    monkeypatch.setenv("EROFS_TEST_ACCEL", "kvm")
    config.forget()  # a new process: the setting is read once per process
    assert vm.kvm_usable(None) is True


def test_a_kernel_that_does_not_boot_under_kvm_means_tcg_and_is_remembered(probe_env, monkeypatch):
    kernel = probe_env / "bzImage"
    kernel.write_bytes(b"x")
    calls = []
    monkeypatch.setattr(vm, "_qemu_kvm_starts", lambda: True)
    monkeypatch.setattr(vm, "_kernel_boots_under_kvm", lambda k: calls.append(k) or False)
    assert vm.kvm_usable(kernel) is False
    assert calls == [kernel]
    vm.kvm_usable.cache_clear()
    assert vm.kvm_usable(kernel) is False and len(calls) == 1   # the stamp answered
    assert (probe_env / "cache" / "kvm-probe").read_text().endswith(" no")


def test_qemu_starting_is_not_enough_to_stamp_yes(probe_env, monkeypatch):
    monkeypatch.setattr(vm, "_qemu_kvm_starts", lambda: True)
    assert vm.kvm_usable(None) is True
    assert not (probe_env / "cache" / "kvm-probe").exists()


def _fake_vng(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_kvm_internal_error_stops_the_guest_and_switches_to_tcg(probe_env, monkeypatch, capsys):
    kernel = probe_env / "bzImage"
    kernel.write_bytes(b"x")
    # Like qemu after the error: the lines, then paused forever (here: a sleeping child).
    vng = _fake_vng(probe_env / "vng", "echo 'mem auto-init: stack:all(zero)' >&2\n"
                    "echo 'KVM internal error. Suberror: 1' >&2\necho 'emulation failure' >&2\n"
                    "sleep 600 & wait\n")
    monkeypatch.setattr(vm.GuestRun, "vng_argv", lambda self: [str(vng)])
    monkeypatch.setattr(vm.deps, "check", lambda *a: None)
    monkeypatch.setattr(vm, "_qemu_kvm_starts", lambda: True)
    monkeypatch.setattr(vm, "_kernel_boots_under_kvm", lambda k: True)
    assert vm.kvm_usable(kernel) is True
    run = vm.GuestRun(kernel=kernel, command=["true"], console_log=probe_env / "console.log")
    monkeypatch.setattr(vm.sys, "stdin", open(os.devnull))  # noqa: SIM115 (pytest's has no fd)
    monkeypatch.setattr(vm.sys, "stdout", open(os.devnull, "w"))  # noqa: SIM115
    t0 = time.monotonic()
    rc = run.run()
    assert time.monotonic() - t0 < 10, "the runner waited on a guest that KVM had stopped"
    assert rc != 0
    err = capsys.readouterr().err
    assert "KVM stopped the guest" in err and "KVM internal error" in err, err
    assert vm.kvm_usable(kernel) is False
