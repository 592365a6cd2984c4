"""Tests that boot VMs of their own from the controller (pytest tests/host)."""

from pathlib import Path

import pytest

from erofs_domains.base import config


@pytest.fixture
def test_kernel() -> Path:
    """The kernel under test, as the controller resolved it."""
    run = config.current()
    if run.in_vm:
        pytest.skip("boots VMs of its own: runs only on the controller (pytest tests/host)")
    if not run.kernel or not Path(run.kernel).is_file():
        pytest.skip("needs a test kernel: --kernel or EROFS_TEST_KERNEL")
    return Path(run.kernel)
