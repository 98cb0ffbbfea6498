"""Check a recorded dataset against the simulator that produced it.

    python -m emu_world.data.verify datasets/aloha_fold [--episodes 3]
    python -m emu_world.data.verify datasets/aloha_fold --tokenizer checkpoints/tokenizer --stride 10

For an emu-world recording (``meta/emu_world.json`` names the env and each episode's seed), it
replays the first episodes with the same agent and seed, then compares: actions (must match
exactly: the sims are deterministic), episode lengths, and the decoded video frames against the
raw renders (PSNR; video is lossy). Frames are decoded by emu-world's loader and, for one
episode, by lerobot's ``LeRobotDataset`` too. With ``--tokenizer``, also what the video does to the
vision codes, every ``--stride``-th frame (the world model's frame rate): the fraction of the decoded
frames' codes equal to the raw renders' codes (``codes_equal``), and the fraction of codes that change
between consecutive frames in each (``codes_changed``: raw vs dataset; extra change is compression
noise the world model would learn). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from emu_world.data.robot_dataset import IMAGE_PREFIX, DatasetError, RobotDataset
from emu_world.errors import UserError, reports_user_errors


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def replay(env_name: str, seed: int, cameras: list[str], image_size: int, length: int):
    """Raw frames (T, H, W, 3) per camera and actions (T, A) of the scripted expert's episode."""
    import envs

    env = envs.make(env_name, cameras=cameras, image_size=image_size, max_episode_steps=length)
    expert = envs.make_expert(env_name, env)
    obs, info = env.reset(seed=seed)
    expert.reset(obs, info)
    frames = {c: [] for c in cameras}
    actions = []
    try:
        for _ in range(length):
            for c in cameras:
                frames[c].append(obs["pixels"][c])
            obs, _, terminated, truncated, info = env.step(expert.act(obs, info))
            actions.append(np.asarray(env.unwrapped.last_action, dtype=np.float32).reshape(-1))
            if terminated or truncated:
                break
    finally:
        env.close()
    return {c: np.stack(v) for c, v in frames.items()}, np.stack(actions)


def code_report(tokenizer, decoded: np.ndarray, raw: np.ndarray, stride: int) -> dict[str, float]:
    """Codes of every ``stride``-th decoded and raw frame: agreement, and change between consecutive frames."""
    a, b = tokenizer.encode(decoded[::stride]).numpy(), tokenizer.encode(raw[::stride]).numpy()  # (n, h, w)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return {"codes_equal": round(float((a == b).mean()), 4),
            "codes_changed_raw": round(float((b[1:] != b[:-1]).mean()), 4) if n > 1 else None,
            "codes_changed_dataset": round(float((a[1:] != a[:-1]).mean()), 4) if n > 1 else None}


def verify(root: str | Path, episodes: int = 3, tokenizer: str | Path | None = None, stride: int = 1) -> dict:
    if stride < 1:
        raise UserError(f"stride must be >= 1 (frames between compared codes), got {stride}")
    tok = None
    if tokenizer is not None:
        from emu_world.models.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    ds = RobotDataset(root)
    prov = ds.provenance
    if not prov.get("env") or prov.get("agent") != "scripted":
        raise DatasetError(f"{root} was not recorded by emu-world's scripted experts (no provenance); "
                           "nothing to replay against")
    cams = [k[len(IMAGE_PREFIX):] for k in ds.camera_keys]
    per_episode = []
    for ep_rec in prov["episodes"][:episodes]:
        ep = ds.episode(ep_rec["episode_index"])
        raw, actions = replay(prov["env"], int(ep_rec["seed"]), cams, int(prov["image_size"]), ep.length)
        per_episode.append({
            "episode": ep.index, "seed": ep_rec["seed"], "length": ep.length,
            "replayed_length": int(actions.shape[0]),
            "actions_max_abs_diff": float(np.max(np.abs(actions - ep.actions))) if actions.shape == ep.actions.shape
            else None,
            "psnr": {c: round(psnr(ep.frames[IMAGE_PREFIX + c], raw[c]), 2) for c in cams},
        })
        if tok is not None:
            per_episode[-1]["codes"] = {c: code_report(tok, ep.frames[IMAGE_PREFIX + c], raw[c], stride) for c in cams}
    # lerobot's own loader on one frame, in this (fresh) process
    item = ds.lerobot[0]
    lerobot_frame = (item[ds.camera_keys[0]].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    ours_frame = ds.episode(0).frames[ds.camera_keys[0]][0]
    codes = {}
    if tok is not None:
        reports = [r for e in per_episode for r in e["codes"].values()]
        codes = {f"mean_{k}": round(float(np.mean([r[k] for r in reports if r[k] is not None])), 4)
                 for k in reports[0] if any(r[k] is not None for r in reports)}
        codes.update({"tokenizer": tok.identity(), "stride": stride})
    return {
        "dataset_root": str(root), "env": prov["env"], "episodes": ds.num_episodes, "frames": ds.num_frames,
        **codes,
        "checked": per_episode,
        "mean_psnr": round(float(np.mean([v for e in per_episode for v in e["psnr"].values()])), 2),
        "actions_exact": all(e["actions_max_abs_diff"] == 0.0 for e in per_episode),
        "lerobot_vs_ours_frame0_psnr": round(psnr(lerobot_frame, ours_frame), 2),
        "lerobot_subtask": item.get("subtask"),
    }


@reports_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="dataset folder (the one holding meta/info.json)")
    parser.add_argument("--episodes", type=int, default=3, help="how many episodes to replay")
    parser.add_argument("--tokenizer", default=None, help="vision tokenizer folder: also compare the codes")
    parser.add_argument("--stride", type=int, default=1, help="compare codes of every k-th frame")
    args = parser.parse_args()
    print(json.dumps(verify(args.root, args.episodes, args.tokenizer, args.stride)), flush=True)


if __name__ == "__main__":
    main()
