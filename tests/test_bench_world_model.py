"""``python -m emu_world.bench world_model`` on a tiny untrained export (tiny tokenizer, tiny layout and
model, a WidowX binner): the bench runs end to end with the JSON keys, copy-last PSNR is right on a
constructed episode, greedy rollouts are deterministic, and a missing export or another tokenizer is
refused with the fix named."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emu_world.bench import run_benchmark
from emu_world.bench.common import teacher_forced_codes
from emu_world.bench.world_model import measure_task
from emu_world.rollouts import EncodedEpisode, Episode, interval_conditions, load_export, rollout
from emu_world.config import CONFIG_DIR, to_dataclass
from emu_world.models.generate import GenerationConfig, Generator, Sampling
from emu_world.models.layout import ActionBinner, LayoutConfig, SequenceLayout
from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer
from emu_world.models.world_model import WorldModel, WorldModelConfig

torch.set_num_threads(1)  # tiny tensors; the machine is shared


def tiny_layout_config() -> LayoutConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["layout=tiny"])
    return to_dataclass(LayoutConfig, cfg.layout)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, Path]:
    """An untrained tiny tokenizer (32x32 frames, 4x4 codes) and a world-model folder laid out as
    ``train stage=world_model`` exports it, trained (nominally) on a WidowX dataset."""
    tmp = tmp_path_factory.mktemp("bench_wm")
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        tok_cfg = compose(config_name="train", overrides=["tokenizer=tiny"]).tokenizer
    tok = VisionTokenizer(to_dataclass(TokenizerConfig, tok_cfg))
    tok.save(tmp / "tokenizer")
    layout_cfg = tiny_layout_config()
    layout = SequenceLayout.from_config(layout_cfg, tok.codebook_size, tuple(tok.grid))
    out = tmp / "world_model"
    WorldModel(WorldModelConfig.preset("tiny"), layout).save(out)
    (out / "binners").mkdir()
    ActionBinner(-np.ones(7), np.ones(7), layout_cfg.action_bins).save(out / "binners" / "widowx_pick_place.json")
    manifest = {
        "tokenizer": {"path": str(tmp / "tokenizer"), "identity": tok.identity()},
        "config": {"layout": asdict(layout_cfg),
                   "data": {"frame_stride": {"widowx": 2, "explore": 1}, "frames_per_window": 3, "max_len": 256,
                            "rows": 2}},
        "data": [{"name": "widowx_pick_place", "embodiment": "widowx", "cameras": ["observation.images.front"],
                  "binner": "binners/widowx_pick_place.json"}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return {"tokenizer": tmp / "tokenizer", "world_model": out}


def bench_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "bench"), version_base="1.3"):
        return compose(config_name="world_model", overrides=list(overrides))


def test_bench_runs_and_reports_the_keys(export, tmp_path):
    cfg = bench_cfg(f"checkpoint={export['world_model']}", f"tokenizer={export['tokenizer']}",
                    "horizons=[1,2]", "episodes=1", "starts=2", "max_episode_steps=12", "throughput.steps=1",
                    "throughput.block_mask=true", f"output={tmp_path / 'bench.json'}")
    summary = run_benchmark("world_model", cfg)
    for key in ("psnr_1", "psnr_2", "copy_last_psnr_1", "copy_last_psnr_2", "ceiling_psnr", "token_acc_1",
                "sec_per_frame", "train_tokens_per_second", "peak_rss_mb", "mean_psnr_1", "copy_last_token_acc_1",
                "teacher_forced_token_acc_1"):
        assert np.isfinite(summary[key]), key
    assert 0 <= summary["copy_last_token_acc_1"] <= 1
    assert summary["train_tokens_per_second_block_mask"] > 0 and summary["packed_attention_speedup"] > 0
    assert summary["train_precision"] == "float32"  # the export's train.precision (absent: float32)
    assert summary["headline_task"] == "widowx_pick_place"  # aloha_fold is not in this export
    assert list(summary["per_task"]) == ["widowx_pick_place"]
    assert summary["per_task"]["widowx_pick_place"]["rollouts"] == 2
    assert json.loads((tmp_path / "bench.json").read_text())["psnr_1"] == summary["psnr_1"]
    # the gain over copy-last is the mean of the per-rollout differences, with a 95% interval
    assert summary["psnr_gain_1"] == pytest.approx(summary["psnr_1"] - summary["copy_last_psnr_1"], abs=2e-4)
    assert summary["psnr_gain_ci95_1"] >= 0


def test_gain_over_copy_interval():
    from emu_world.bench.common import gain_over_copy

    got = gain_over_copy([25.0, 27.0, 26.0, 24.0], [23.0, 23.0, 23.0, 23.0])  # gains 2, 4, 3, 1
    assert got["gain"] == pytest.approx(2.5)
    assert got["gain_ci95"] == pytest.approx(1.96 * np.std([2, 4, 3, 1], ddof=1) / 2, abs=1e-4)
    assert gain_over_copy([25.0], [23.0]) == {"gain": 2.0, "gain_ci95": None}  # one rollout: no interval


def test_copy_last_psnr_and_deterministic_greedy_rollouts(export):
    tok = VisionTokenizer.load(export["tokenizer"])
    ex = load_export(export["world_model"], tok)
    spec = ex.tasks["widowx_pick_place"]
    # three flat frames 10 grey levels apart: copy-last MSE is 100 at 1 step and 400 at 2 steps
    frames = np.stack([np.full((32, 32, 3), 100 + 10 * i, dtype=np.uint8) for i in range(3)])
    rng = np.random.default_rng(0)
    ep = Episode("widowx_pick_place", "put the block in the bowl", 0, frames,
                 rng.uniform(-1, 1, (6, 7)).astype(np.float32))
    gen = Generator(ex.model, ex.layout, GenerationConfig(vision=Sampling(0.0)), action_dim=7)
    cfg = OmegaConf.create({"horizons": [1, 2], "context_frames": 1, "starts": 1, "seed": 0})
    result, samples = measure_task(gen, tok, ex, spec, [ep], cfg)
    rows = result["horizons"]
    assert rows["1"]["copy_psnr"] == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-3)
    assert rows["2"]["copy_psnr"] == pytest.approx(10 * math.log10(255**2 / 400), abs=1e-3)
    assert result["rollouts"] == 1 and len(samples) == 1
    codes = tok.encode(frames).numpy()
    for h in (1, 2):  # copying the context frame's codes scores the codes that stayed
        assert rows[str(h)]["copy_token_acc"] == pytest.approx(float((codes[0] == codes[h]).mean()), abs=1e-4)
    conds = interval_conditions(ex.layout, spec, ep)
    first, _ = rollout(gen, ex.layout, spec, ep, codes, conds, 0, 1, 2, seed=0)
    again, _ = rollout(gen, ex.layout, spec, ep, codes, conds, 0, 1, 2, seed=5)
    assert first.shape == (2, *tok.grid)
    np.testing.assert_array_equal(first, again)  # greedy: the seed does not matter
    for h in (1, 2):  # the split of the generated frame's accuracy: codes that stayed / changed since frame 0
        static, hit = codes[0] == codes[h], first[h - 1] == codes[h]
        r = rows[str(h)]
        assert r["token_acc"] == pytest.approx(float(hit.mean()), abs=1e-4)
        assert r["static_token_acc"] == (pytest.approx(float(hit[static].mean()), abs=1e-4) if static.any() else None)
        assert r["changed_token_acc"] == (pytest.approx(float(hit[~static].mean()), abs=1e-4)
                                          if (~static).any() else None)
    # teacher forcing reads the true codes; its first code sees the same prefix as the generated one
    forced = teacher_forced_codes(ex, spec, EncodedEpisode(ep, codes, tok.decode(codes).numpy(), conds), 0, 1)
    assert forced.shape == tuple(tok.grid) and forced.flat[0] == first[0].flat[0]
    assert result["teacher_forced_1"]["token_acc"] == pytest.approx(float((forced == codes[1]).mean()), abs=1e-4)


def test_missing_export_and_other_tokenizer_are_refused(export, tmp_path):
    tok = VisionTokenizer.load(export["tokenizer"])
    with pytest.raises(FileNotFoundError, match="python -m emu_world.train stage=world_model"):
        load_export(tmp_path / "nothing", tok)
    torch.manual_seed(1)
    other = VisionTokenizer(tok.config)
    with pytest.raises(ValueError, match="tokenizer=<folder>"):
        load_export(export["world_model"], other)


def test_shipped_default_world_model_matches_the_shipped_tokenizer():
    """checkpoints/world_model loads against checkpoints/tokenizer (identity, layout spec, binners)
    and says how it was made; all shipped checkpoints together stay well under 50 MB."""
    from emu_world.config import resolve_path
    from emu_world.rollouts import load_export
    from emu_world.models.tokenizer import load_tokenizer

    root = resolve_path("checkpoints")
    ex = load_export(root / "world_model", load_tokenizer(root / "tokenizer"))
    assert {"aloha_fold", "aloha_transfer_cube", "aloha_insertion", "widowx_pick_place", "explore_room"} <= set(ex.tasks)
    m = ex.manifest
    assert {"command", "config", "data", "code_version", "metrics", "train_seconds"} <= set(m)
    assert m["stage"] == "dida" and m["init"]["train_seconds"] > 0 and m["dida"]["adaptation_vs_ar_training"] <= 0.2
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 40 * 2**20


def test_shipped_aloha_fold_model_is_an_int8_export_of_the_shipped_tokenizer():
    """checkpoints/world_model_aloha_fold (the per-task model) loads against checkpoints/tokenizer
    from its int8 weights and names its data and the chain of runs behind it."""
    from emu_world.config import resolve_path
    from emu_world.rollouts import load_export
    from emu_world.models.tokenizer import load_tokenizer

    root = resolve_path("checkpoints")
    ex = load_export(root / "world_model_aloha_fold", load_tokenizer(root / "tokenizer"))
    assert set(ex.tasks) == {"aloha_fold"}
    assert json.loads((root / "world_model_aloha_fold" / "config.json").read_text())["dtype"] == "int8"
    assert all(p.dtype == torch.float32 for p in ex.model.parameters())
    m = ex.manifest
    # the whole chain of runs behind it: the init export's (its own and its inits') plus this run's
    assert m["train_seconds_total"] == pytest.approx(m["init"]["train_seconds_total"] + m["train_seconds"], abs=0.2)
    assert "seed=50" in m["data_note"] and (root / "world_model_aloha_fold" / "model.safetensors").stat().st_size < 8 * 2**20
