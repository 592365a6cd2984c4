"""Tests that boot VMs of their own from the controller (pytest tests/host)."""

import os
from pathlib import Path

import pytest


@pytest.fixture
def test_kernel(pytestconfig) -> Path:
    """The kernel under test, as the controller resolved it."""
    if os.environ.get("EROFS_TEST_IN_VM") == "1":
        pytest.skip("boots VMs of its own: runs only on the controller (pytest tests/host)")
    k = pytestconfig.getoption("kernel", None) or os.environ.get("EROFS_TEST_KERNEL")
    if not k or not Path(k).is_file():
        pytest.skip("needs a test kernel: --kernel or EROFS_TEST_KERNEL")
    return Path(k)
