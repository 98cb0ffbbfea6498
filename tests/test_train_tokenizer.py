"""``python -m emu_world.train stage=tokenizer`` on a tiny recorded dataset (experiment=tiny):
the loss falls, resume reproduces the loss curve exactly, mismatched checkpoints are refused,
the exported folder carries a manifest; and the benchmark runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.record import record
from emu_world.models.tokenizer import VisionTokenizer
from emu_world.train import run_stage
from emu_world.data.frames import decode_episode_frames
from emu_world.data.frames import resolve_roots
from emu_world.train.checkpoint import find_checkpoint
from emu_world.train.loop import batch_indices, cosine_lr

TASK = "widowx_pick_place"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three short 32x32 widowx episodes (the last one is held out by experiment=tiny)."""
    root = tmp_path_factory.mktemp("data") / TASK
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="record", overrides=[f"env={TASK}", "env.image_size=32", "env.max_episode_steps=30"])
    record(to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), root, "test/widowx", episodes=3,
           seed=0, keep_failures=True, progress=False)
    return root


def train_cfg(dataset: Path, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "stage=tokenizer", "experiment=tiny", f"dataset.root={dataset}", f"run_dir={run_dir}", *overrides])


def losses(history) -> list[float]:
    return [h["loss"] for h in history]


def test_tiny_training_lowers_the_loss_and_exports(dataset, tmp_path):
    result = run_stage(train_cfg(dataset, tmp_path / "run", "train.steps=30", "train.lr=3e-3"))
    curve = losses(result.history)
    assert len(curve) == 30 and all(np.isfinite(curve))
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:3])
    assert result.step == 30 and result.final_metrics is not None
    # the exported tokenizer: weights, config, manifest with provenance and metrics
    out = result.export_dir
    assert out == tmp_path / "run" / "tokenizer"
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("command", "code_version", "config", "data", "metrics", "train_seconds", "identity"):
        assert key in manifest
    assert manifest["data"][0]["held_out_episodes"] == [2]
    tok = VisionTokenizer.load(out)
    assert manifest["identity"] == tok.identity() == json.loads((out / "config.json").read_text())["identity"]
    assert 0 < manifest["metrics"]["code_usage"] <= 1 and manifest["metrics"]["psnr"] > 5
    assert 0 < manifest["metrics"]["code_stability"] <= 1
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in records) and any("batch_perplexity" in r for r in records)


def test_bfloat16_autocast_trains_close_to_float32(dataset, tmp_path):
    """train.precision=bfloat16: encoder and decoder under autocast, the quantiser in float32; the loss
    curve follows float32's closely and still falls; resume stays bit for bit."""
    common = ("train.steps=12", "train.lr=3e-3", "tokenizer_loss.consistency=0.5")
    fp32 = losses(run_stage(train_cfg(dataset, tmp_path / "fp32", *common)).history)
    bf16 = losses(run_stage(train_cfg(dataset, tmp_path / "bf16", *common, "train.precision=bfloat16")).history)
    assert bf16 != fp32  # autocast was on
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)
    assert np.mean(bf16[-3:]) < 0.8 * np.mean(bf16[:3])
    cut = run_stage(train_cfg(dataset, tmp_path / "cut", *common, "train.precision=bfloat16", "train.stop_after=5"))
    rest = run_stage(train_cfg(dataset, tmp_path / "cut", *common, "train.precision=bfloat16", "resume=true"))
    assert losses(cut.history) + losses(rest.history) == bf16


@pytest.mark.parametrize("extra", [[], ["tokenizer_loss.consistency=0.5"]], ids=["default", "consistency"])
def test_resume_reproduces_the_same_loss_curve(dataset, tmp_path, extra):
    full = run_stage(train_cfg(dataset, tmp_path / "a", "train.steps=8", *extra))
    part1 = run_stage(train_cfg(dataset, tmp_path / "b", "train.steps=8", "train.stop_after=3", *extra))
    assert part1.step == 3 and part1.final_metrics is None and part1.export_dir is None
    part2 = run_stage(train_cfg(dataset, tmp_path / "b", "train.steps=8", "resume=true", *extra))
    assert ("consistency" in full.history[-1]) == bool(extra)
    assert [h["step"] for h in part2.history] == list(range(4, 9))
    assert losses(part1.history) + losses(part2.history) == losses(full.history)  # bit for bit
    a = VisionTokenizer.load(tmp_path / "a" / "tokenizer")
    b = VisionTokenizer.load(tmp_path / "b" / "tokenizer")
    assert a.identity() == b.identity()
    # the metrics log holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def test_freeze_codes_trains_a_new_decoder_for_the_same_codes(dataset, tmp_path):
    """init=<tokenizer> tokenizer_loss.freeze_codes=true with a finer decoder: every frame keeps its
    codes (same code identity, so world models trained on them stay valid), the coarse decoder
    levels start from init's, and the new decoder trains."""
    base = run_stage(train_cfg(dataset, tmp_path / "base", "train.steps=6")).export_dir
    old = VisionTokenizer.load(base)
    result = run_stage(train_cfg(dataset, tmp_path / "fine", "train.steps=12", "train.lr=3e-3", f"init={base}",
                                 "tokenizer_loss.freeze_codes=true", "tokenizer.decoder_upsample=[8]"))
    new = VisionTokenizer.load(result.export_dir)
    manifest = json.loads((result.export_dir / "manifest.json").read_text())
    assert new.code_identity() == old.code_identity() == manifest["code_identity"] == manifest["init"]["code_identity"]
    assert new.identity() != old.identity() and manifest["init"]["codes_kept"] is True
    frames = np.stack(decode_episode_frames(_ds(dataset), "observation.images.front", [2], 1)[0][:8])
    assert torch.equal(new.encode(frames), old.encode(frames))
    # the coarse decoder levels started from init's; the new level and head did not exist there
    fresh = VisionTokenizer(new.config)
    assert {k for k, v in fresh.state_dict().items() if k in old.state_dict() and v.shape == old.state_dict()[k].shape} \
        >= {"decoder.proj.weight", "decoder.levels.0.0.conv1.weight"}
    assert "decoder.levels.1.0.weight" not in old.state_dict()
    curve = losses(result.history)
    assert "commit" not in result.history[0] and np.mean(curve[-3:]) < np.mean(curve[:3])
    # without freeze_codes the encoder trains too: the codes change
    free = run_stage(train_cfg(dataset, tmp_path / "free", "train.steps=3", "train.lr=3e-3", f"init={base}"))
    assert VisionTokenizer.load(free.export_dir).code_identity() != old.code_identity()
    # misuse: freeze without init, or an encoder setting that differs from init's
    with pytest.raises(ValueError, match="name it with init=<tokenizer folder>"):
        run_stage(train_cfg(dataset, tmp_path / "x", "tokenizer_loss.freeze_codes=true"))
    with pytest.raises(ValueError, match="differs in codebook_size: config 32 vs init 64"):
        run_stage(train_cfg(dataset, tmp_path / "y", f"init={base}", "tokenizer_loss.freeze_codes=true",
                            "tokenizer.codebook_size=32"))


def _ds(root: Path):
    from emu_world.data.robot_dataset import RobotDataset

    return RobotDataset(root, check_videos=False)


def test_checkpoint_with_another_config_is_rejected(dataset, tmp_path):
    run_stage(train_cfg(dataset, tmp_path / "run", "train.steps=4", "train.stop_after=2"))
    with pytest.raises(ValueError, match=r"different tokenizer config \(codebook_size: config 32 vs checkpoint 64"):
        run_stage(train_cfg(dataset, tmp_path / "run", "train.steps=4", "resume=true", "tokenizer.codebook_size=32"))
    with pytest.raises(FileExistsError, match="resume=true"):
        run_stage(train_cfg(dataset, tmp_path / "run", "train.steps=4"))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        run_stage(train_cfg(dataset, tmp_path / "empty", "resume=true"))
    assert find_checkpoint(tmp_path / "run") is not None
    assert not list((tmp_path / "run").glob(".checkpoint*"))  # no temporary folders left behind


def test_bad_data_settings_name_the_fix(dataset, tmp_path):
    with pytest.raises(ValueError, match="tokenizer.image_size=64"):
        run_stage(train_cfg(dataset, tmp_path / "r1", "tokenizer.image_size=64"))
    with pytest.raises(FileNotFoundError, match="emu_world.record"):
        run_stage(train_cfg(tmp_path / "nothing", tmp_path / "r2"))
    with pytest.raises(ValueError, match="eval_episodes"):
        run_stage(train_cfg(dataset, tmp_path / "r3", "dataset.eval_episodes=3"))
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage(train_cfg(dataset, tmp_path / "r4", "stage=nope"))
    with pytest.raises(ValueError, match="the tokenizer trains on CPU"):
        run_stage(train_cfg(dataset, tmp_path / "r5", "train.parallel=fsdp"))


def test_fast_frame_reader_matches_the_dataset_loader(dataset):
    from emu_world.data.robot_dataset import RobotDataset

    assert resolve_roots([dataset.parent]) == [dataset]
    ds = RobotDataset(dataset)
    key = ds.camera_keys[0]
    ours = decode_episode_frames(ds, key, [0, 2], stride=2)
    for got, e in zip(ours, [0, 2]):
        ref = ds.episode(e).frames[key][::2]
        assert got.shape == ref.shape and np.array_equal(got, ref)


def test_schedule_and_data_order_are_pure_functions():
    assert cosine_lr(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    a = batch_indices(7, 4, 10, seed=3)
    assert np.array_equal(a, batch_indices(7, 4, 10, seed=3)) and len(set(a.tolist())) == 4
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(0, 20, 10, seed=0)


def test_bench_tokenizer_on_a_dataset_and_from_the_simulator(dataset, tmp_path):
    from emu_world.bench import run_benchmark

    run = run_stage(train_cfg(dataset, tmp_path / "run", "train.steps=2"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "bench"), version_base="1.3"):
        cfg = compose(config_name="tokenizer", overrides=[
            f"checkpoint={run.export_dir}", f"dataset.root={dataset}", "dataset.held_out=1", "batch_size=8",
            f"picture={tmp_path / 'recon.png'}", f"output={tmp_path / 'bench.json'}", "speed_frames=16",
            "train.steps=2", "train.batch_size=4"])
    summary = run_benchmark("tokenizer", cfg)
    assert set(summary["train_sec_per_step"]) == {"float32", "bfloat16"} and summary["train_steps_timed"] == 2
    times = summary["train_sec_per_step"]
    assert summary["train_speedup"] == pytest.approx(times["float32"] / times["bfloat16"], rel=0.02)
    for key in ("psnr", "ssim", "code_usage", "tokens_per_frame", "frames_per_second", "code_stability"):
        assert key in summary
    assert 0.0 <= summary["code_stability"] <= 1.0
    row = next(iter(summary["per_task"].values()))
    assert 0.0 <= row["detail_fraction"] <= 1.0 and 0.0 <= row["detail_error_share"] <= 1.0
    assert "detail_psnr" in summary and row["flat_psnr"] > 0
    assert summary["tokens_per_frame"] == 16 and (tmp_path / "recon.png").exists()
    assert json.loads((tmp_path / "bench.json").read_text())["identity"] == summary["identity"]
    # recording held-out episodes itself (the default mode), one short task
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "bench"), version_base="1.3"):
        cfg = compose(config_name="tokenizer", overrides=[
            f"checkpoint={run.export_dir}", f"tasks=[{TASK}]", "image_size=32", "picture=null", "speed_frames=16",
            f"output={tmp_path / 'bench2.json'}", "decode_precision=bfloat16", "train.steps=0"])
    summary = run_benchmark("tokenizer", cfg)
    assert "train_sec_per_step" not in summary
    assert list(summary["per_task"]) == [f"{TASK}/front"] and summary["frames"] > 10
    assert summary["decode_precision"] == "bfloat16" and summary["decode_speedup"] > 0
    assert summary["decode_fps"] == pytest.approx(summary["decode_speedup"] * summary["decode_fps_float32"], rel=0.01)


def test_detail_split_places_the_error_in_the_cells_that_carry_it():
    from emu_world.image_metrics import detail_split, psnr

    rng = np.random.default_rng(0)
    frames = np.full((2, 16, 16, 3), 90, np.uint8)  # flat grey, 4x4 cells of 4 pixels
    frames[:, :4, :8] = rng.integers(0, 256, (2, 4, 8, 3))  # two textured cells per frame
    recon = frames.copy()
    recon[:, :4, :8] = np.clip(frames[:, :4, :8].astype(int) + 6, 0, 255)  # error only in the textured cells
    out = detail_split(frames, recon, patch=4, min_std=8.0)
    assert out["detail_fraction"] == pytest.approx(2 / 16)
    assert out["detail_error_share"] == pytest.approx(1.0) and out["flat_psnr"] == 100.0
    assert out["detail_psnr"] < psnr(frames, recon) < 100.0  # the frame mean dilutes it with the flat cells
    recon[:, 8:, 8:] += 10  # now the flat background is off too
    out = detail_split(frames, recon, patch=4, min_std=8.0)
    assert 0.0 < out["detail_error_share"] < 1.0 and out["flat_psnr"] == pytest.approx(10 * np.log10(255**2 / (100 * 4 / 14)))  # 4 of 14 flat cells off by 10
    assert detail_split(frames, frames, 4)["detail_error_share"] == 0.0
    with pytest.raises(ValueError, match="patch=5"):
        detail_split(frames, recon, patch=5)


def test_nudge_moves_every_value_by_at_most_one_level():
    from emu_world.image_metrics import nudge

    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    frames[0] = 0
    frames[1] = 255
    out = nudge(frames, 7)
    diff = out.astype(int) - frames.astype(int)
    assert out.dtype == np.uint8 and np.abs(diff).max() == 1 and set(np.unique(diff[2])) == {-1, 0, 1}
    assert out[0].min() == 0 and out[1].max() == 255  # clipped
    np.testing.assert_array_equal(out, nudge(frames, 7))


def test_consistency_loss_is_the_ce_of_noisy_code_logits_and_trains_encoder_and_codebook():
    from emu_world.models.tokenizer import TokenizerConfig
    from emu_world.train.tokenizer import TokenizerLossConfig, consistency_loss

    torch.manual_seed(0)
    model = VisionTokenizer(TokenizerConfig(image_size=32, channels=[8, 16], encoder_blocks=[0, 1],
                                            decoder_blocks=[1, 1], code_dim=8, codebook_size=16))
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 127.5 - 1.0
    codes = model(x).quant.codes  # (2, 4, 4)
    loss = consistency_loss(model, x, codes, 2, torch.Generator().manual_seed(3))
    # the same noise by hand: integer grey levels in [-2, 2], clipped to the image range
    delta = torch.randint(-2, 3, x.shape, generator=torch.Generator().manual_seed(3)).float()
    assert set(delta.unique().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    noisy = (x + delta * 2 / 255).clamp(-1, 1)
    logits = model.quantizer.logits(model.encode_latents(noisy))
    assert logits.shape == (2 * 4 * 4, 16)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, codes.reshape(-1)))
    loss.backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in model.decoder.parameters())  # codes only: the decoder is not involved
    with pytest.raises(ValueError, match="consistency_noise >= 1"):
        TokenizerLossConfig(consistency=1.0, consistency_noise=0)


def test_bench_cli_names_the_benchmarks():
    proc = subprocess.run([sys.executable, "-m", "emu_world.bench", "nope"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(dataset, tmp_path, run_group):
    """Data-parallel training under torchrun (gloo, CPU) finishes and exports."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "emu_world.train", "stage=tokenizer", "experiment=tiny", f"dataset.root={dataset}",
           f"run_dir={tmp_path / 'ddp'}", "train.steps=4"]
    proc = run_group(cmd, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "tokenizer" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert torch.isfinite(torch.tensor(manifest["metrics"]["psnr"]))


def test_shipped_yaml_validates_without_building():
    from emu_world.train.tokenizer import parse_config

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for overrides in ([], ["experiment=tiny"], ["tokenizer=f16"]):
            parts = parse_config(compose(config_name="train", overrides=overrides))
            assert parts.loop.batch_size > 0 and parts.tokenizer.image_size % parts.tokenizer.downsample == 0
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "bench"), version_base="1.3"):
        cfg = compose(config_name="tokenizer")
    assert set(cfg.tasks) <= set(__import__("envs").TASKS)


def test_shipped_default_tokenizer_matches_its_config_and_manifest():
    from emu_world.config import resolve_path
    from emu_world.config import to_dataclass as as_dc
    from emu_world.models.tokenizer import TokenizerConfig

    path = resolve_path("checkpoints/tokenizer")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        default = as_dc(TokenizerConfig, compose(config_name="train").tokenizer)
    tok = VisionTokenizer.load(path, config=default)  # refuses a file trained with another config
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["identity"] == tok.identity() == json.loads((path / "config.json").read_text())["identity"]
    assert (path / "model.safetensors").stat().st_size < 8 * 2**20
    assert {"command", "config", "data", "code_version", "metrics", "train_seconds"} <= set(manifest)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
