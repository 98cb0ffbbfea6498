"""Where a result came from: the code version and the command line, recorded in every manifest."""

from __future__ import annotations

import os
import subprocess
import sys

from emu_world.config import REPO_ROOT


def code_version() -> str:
    """``git describe``-style version of the repository: short hash, plus ``-dirty`` with local edits."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(module: str) -> str:
    """The command that runs now, as ``python -m <module> ...`` (or ``torchrun ...`` under torchrun)."""
    launcher = "torchrun --nproc_per_node=" + os.environ["WORLD_SIZE"] + " -m " if "WORLD_SIZE" in os.environ \
        else "python -m "
    return launcher + " ".join([module, *sys.argv[1:]])
