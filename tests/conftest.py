"""Test-wide settings: offline, deterministic, headless."""

import os
import signal
import subprocess

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import envs  # noqa: E402,F401  (sets MUJOCO_GL before anything imports mujoco)


@pytest.fixture
def run_group():
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` for commands that start children
    (torchrun and its rank workers): the command runs in its own process group, and the whole group is
    killed when ``timeout`` expires (a plain timeout kills the launcher and leaves the workers running)."""

    def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return run
