"""Where the checkout's parts are: the repository root, tools/ and the kernel config fragments.

Programs the suite starts (`python -m erofs_domains.programs...`) run with the root as their
working directory, so the distribution's python3 (the tools run outside the venv) finds the
package there too."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
KCONFIG_DIR = TOOLS / "kconfig"
