"""Every test here runs as root on a kernel with the on-demand features (in a VM)."""

import pytest


@pytest.fixture(autouse=True)
def _kernel_checks(kernel_checks):
    """Requested first, so it is torn down last: after mounts, daemon and cache are gone,
    nothing may be left behind and the kernel log must hold no oops or warning."""
    yield kernel_checks
