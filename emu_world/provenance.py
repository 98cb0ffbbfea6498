"""Where a result came from: the code version and the command line, recorded in every manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

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


_ARGS: list[Sequence[str]] = []  # the arguments of a command run inside another (the pipeline's stages)


@contextmanager
def recorded_command(args: Sequence[str]) -> Iterator[None]:
    """Inside, :func:`command_line` records ``args`` as the command's arguments: a stage the pipeline runs
    in its own process is recorded as ``python -m emu_world.train <args>``, which reproduces it."""
    _ARGS.append(list(args))
    try:
        yield
    finally:
        _ARGS.pop()


def command_line(module: str) -> str:
    """The command that runs now, as ``python -m <module> ...`` (or ``torchrun ...`` under torchrun)."""
    launcher = "torchrun --nproc_per_node=" + os.environ["WORLD_SIZE"] + " -m " if "WORLD_SIZE" in os.environ \
        else "python -m "
    return launcher + " ".join([module, *(_ARGS[-1] if _ARGS else sys.argv[1:])])
