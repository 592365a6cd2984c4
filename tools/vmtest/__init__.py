"""The host side of the suite: kernel and erofs-utils builds, VMs, comparisons, bisection.

The tools run with the distribution's /usr/bin/python3, outside the test venv. They share
the suite's standard-library-only modules (fixtures/process_utils.py: `cmd()` and
`wait_for()`; fixtures/file_digest.py; fixtures/erofs_tools.py), so the repository root
goes on sys.path here, once for every module of the package."""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
