"""Record agent episodes (the scripted experts by default) into a LeRobot v3.0 dataset.

    python -m emu_world.record env=aloha_fold episodes=50 seed=0 dataset.root=datasets/aloha_fold

Attempts seeds ``seed, seed+1, ...`` until ``episodes`` episodes are kept (failed expert
episodes are discarded and listed, or kept and flagged with ``keep_failures=true``). A successful
episode goes on for ``after_success_seconds`` after the task is done (the expert lets go and retreats),
so that policies learn what comes after: the env's success would end it at the first done frame. Writes
through lerobot's API (see :mod:`emu_world.data.recorder`), with subtask annotations when the
agent reports subtasks. Ends with one JSON line: episodes kept, failures, seconds per episode,
size on disk.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from emu_world.agents import make_agent
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.data.recorder import DatasetRecorder, features_for_env
from emu_world.episodes import run_episode
from emu_world.errors import UserError, reports_user_errors
from emu_world.provenance import code_version


def dir_size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def record(env_cfg: EnvConfig, agent_cfg: AgentConfig, root: Path, repo_id: str, episodes: int, seed: int,
           max_attempts: int | None = None, keep_failures: bool = False, mode: str = "create",
           vcodec: str = "h264", crf: int = 0, pix_fmt: str = "yuv444p", progress: bool = True,
           after_success: int = 0) -> dict:
    if episodes <= 0:
        raise UserError(f"episodes must be positive, got {episodes}")
    max_attempts = max_attempts or 2 * episodes
    env = env_cfg.make()
    agent = make_agent(agent_cfg, env_cfg, env)
    u = env.unwrapped
    annotated = hasattr(agent, "subtask_index")
    recorder = DatasetRecorder(
        root, repo_id, fps=env_cfg.fps, features=features_for_env(env, annotated=annotated),
        robot_type=env_cfg.name.split("_")[0], subtask_texts=list(u.subtasks) if annotated else None,
        mode=mode, vcodec=vcodec, crf=crf, pix_fmt=pix_fmt,
        provenance={"env": env_cfg.name, "gym_id": env_cfg.gym_id, "agent": agent_cfg.name,
                    "image_size": env_cfg.image_size, "cameras": list(env_cfg.cameras),
                    "command": " ".join(["python -m emu_world.record", *sys.argv[1:]]),
                    "code_version": code_version()},
    )
    kept, failed_seeds, seconds = 0, [], []
    bar = tqdm(total=episodes, desc=f"record {env_cfg.name}", disable=not progress)
    try:
        with recorder:
            for attempt in range(max_attempts):
                if kept == episodes:
                    break
                ep_seed = seed + attempt
                start = time.perf_counter()

                def on_step(obs, action, next_obs, reward, terminated, truncated, info, subtask):
                    recorder.add_frame(obs, action, task=u.task, reward=reward, done=terminated or truncated,
                                       success=bool(info["is_success"]), subtask_index=subtask)

                result, _ = run_episode(env, agent, ep_seed, attempt, on_step=on_step, after_success=after_success)
                # open-ended tasks (no success condition) keep every episode
                if result.success or keep_failures or not u.has_success:
                    recorder.save_episode(seed=ep_seed, success=result.success, steps=result.steps)
                    kept += 1
                    bar.update(1)
                else:
                    recorder.discard_episode()
                if u.has_success and not result.success:
                    failed_seeds.append(ep_seed)
                seconds.append(time.perf_counter() - start)
    finally:
        bar.close()
        env.close()
    if kept < episodes:
        raise UserError(
            f"only {kept}/{episodes} episodes kept after {max_attempts} attempts (failed seeds: {failed_seeds}); "
            f"the dataset at {root} holds the {kept} kept episodes. Raise max_attempts or check the agent."
        )
    return {
        "env": env_cfg.name, "dataset_root": str(root), "episodes_kept": kept,
        "total_episodes": recorder.num_episodes, "attempts": len(seconds), "failed_seeds": failed_seeds,
        "keep_failures": keep_failures, "seconds_per_episode": sum(seconds) / len(seconds),
        "size_mb": round(dir_size_mb(root), 2),
    }


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="record")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    if cfg.overwrite and cfg.append:
        raise UserError("overwrite=true and append=true contradict each other; pick one")
    mode = "overwrite" if cfg.overwrite else "append" if cfg.append else "create"
    summary = record(
        to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), Path(cfg.dataset.root),
        cfg.dataset.repo_id, int(cfg.episodes), int(cfg.seed), cfg.max_attempts, bool(cfg.keep_failures),
        mode, cfg.dataset.vcodec, int(cfg.dataset.crf), cfg.dataset.pix_fmt, bool(cfg.progress),
        after_success=round(float(cfg.after_success_seconds) * float(cfg.env.fps)),
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
