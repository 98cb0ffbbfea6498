"""``python -m emu_world.train stage=world_model`` on two tiny recorded datasets (experiment=tiny_world_model,
an untrained tiny tokenizer): the loss falls and held-out metrics are logged, the export carries
binners and a manifest, resume reproduces the loss curve exactly, two gloo ranks under torchrun
agree with one process on the same global batch, and bad settings fail with the fix named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.errors import UserError
from emu_world.models.dida import seeded_generator
from emu_world.models.layout import ActionBinner, LayoutConfig, SequenceLayout
from emu_world.models.text_tokenizer import load_text_tokenizer
from emu_world.record import record
from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer
from emu_world.train import run_stage
from emu_world.train.world_model import changed_code_weights, corrupt_image_inputs
from emu_world.train.checkpoint import find_checkpoint

torch.set_num_threads(1)  # tiny tensors; the machine is shared


def compose_cfg(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Two tiny datasets (WidowX 5 Hz, explore_room 10 Hz; 2 episodes of 32x32 frames each), an untrained
    tiny tokenizer saved as a folder, and its token cache outside the datasets (filled by the first run)."""
    tmp = tmp_path_factory.mktemp("wm")
    torch.manual_seed(0)
    tok = VisionTokenizer(to_dataclass(TokenizerConfig, compose_cfg("train", "tokenizer=tiny").tokenizer))
    tok.save(tmp / "tokenizer")
    for env, steps in (("widowx_pick_place", 40), ("explore_room", 24)):
        cfg = compose_cfg("record", f"env={env}", f"env.max_episode_steps={steps}", "env.image_size=32")
        record(to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), tmp / "data" / env,
               f"test/{env}", episodes=2, seed=0, keep_failures=True, progress=False)
    return {"data": tmp / "data", "tokenizer": tmp / "tokenizer", "cache": tmp / "cache"}


def overrides(world, run_dir: Path, *extra: str) -> list[str]:
    return ["stage=world_model", "experiment=tiny_world_model", f"dataset.root={world['data']}",
            f"world_model.tokenizer={world['tokenizer']}", f"data.token_cache={world['cache']}",
            f"run_dir={run_dir}", "train.threads=1", *extra]


def train(world, run_dir: Path, *extra: str):
    return run_stage(compose_cfg("train", *overrides(world, run_dir, *extra)))


def losses(history) -> list[float]:
    return [h["loss"] for h in history]


def test_tiny_training_lowers_the_loss_logs_heldout_metrics_and_exports(world, tmp_path):
    result = train(world, tmp_path / "run", "train.steps=30", "train.eval_every=10", "world_model.eval_batches=6")
    curve = losses(result.history)
    assert len(curve) == 30 and all(np.isfinite(curve))
    assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:3])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for key in ("loss", "frame_acc", "loss/dynamics", "loss/exploration", "frame_acc/dynamics"):
        assert key in evals[-1]["eval"]
    assert evals[-1]["eval"]["loss"] < evals[0]["eval"]["loss"]
    # the export: weights + config, one binner per robot dataset, a manifest with provenance
    out = result.export_dir
    assert out == tmp_path / "run" / "world_model" and (out / "model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("command", "code_version", "config", "data", "mixture", "metrics", "train_seconds", "tokenizer"):
        assert key in manifest
    assert manifest["tokenizer"]["identity"] == VisionTokenizer.load(world["tokenizer"]).identity()
    assert {d["name"] for d in manifest["data"]} == {"widowx_pick_place", "explore_room"}
    assert ActionBinner.load(out / "binners" / "widowx_pick_place.json").action_dim == 7
    assert not (out / "binners" / "explore_room.json").exists()  # commands, not binned actions


def test_bfloat16_autocast_trains_close_to_float32(world, tmp_path):
    """train.precision=bfloat16: the same run in autocast follows the float32 loss curve closely and
    still learns; the export is the usual float32-built model (float16 file)."""
    fp32 = losses(train(world, tmp_path / "fp32", "train.steps=12", "train.eval_every=0").history)
    result = train(world, tmp_path / "bf16", "train.steps=12", "train.eval_every=0", "train.precision=bfloat16")
    bf16 = losses(result.history)
    assert bf16 != fp32  # autocast was on
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)
    assert np.mean(bf16[-3:]) < 0.9 * np.mean(bf16[:3])
    assert json.loads((result.export_dir / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(ValueError, match="train.precision must be float32 or bfloat16"):
        train(world, tmp_path / "x", "train.precision=fp8")


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    full = train(world, tmp_path / "full", "train.steps=6", "train.save_every=100")
    first = train(world, tmp_path / "cut", "train.steps=6", "train.save_every=100", "train.stop_after=3")
    assert first.step == 3 and first.export_dir is None and find_checkpoint(tmp_path / "cut") is not None
    with pytest.raises(FileExistsError, match="resume=true"):
        train(world, tmp_path / "cut", "train.steps=6")
    rest = train(world, tmp_path / "cut", "train.steps=6", "train.save_every=100", "resume=true")
    assert losses(first.history) + losses(rest.history) == losses(full.history)  # exactly
    a = load_file(str(tmp_path / "full" / "world_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "world_model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_fine_tunes_an_export_from_its_weights(world, tmp_path, capsys):
    """init=<export>: the run starts from the export's weights, model and layout (a composed model
    setting is ignored, and said so), records where it started, and refuses other codes."""
    common = ("train.eval_every=0", "world_model.export_dtype=float32")
    base = train(world, tmp_path / "base", "train.steps=6", *common)
    # learning rate 0: the fine-tune's export holds exactly the init's weights
    kept = train(world, tmp_path / "lr0", f"init={base.export_dir}", "train.steps=2", "train.lr=0",
                 "model.hidden_size=96", *common)
    assert "composed settings ignored: model.hidden_size" in capsys.readouterr().out
    a = load_file(str(base.export_dir / "model.safetensors"))
    b = load_file(str(kept.export_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((kept.export_dir / "manifest.json").read_text())
    base_manifest = json.loads((base.export_dir / "manifest.json").read_text())
    assert manifest["init"]["path"] == str(base.export_dir)
    assert manifest["init"]["train_seconds"] == base_manifest["train_seconds"]
    assert manifest["train_seconds_total"] == round(base_manifest["train_seconds"] + kept.train_seconds, 1)
    assert manifest["config"]["model"] == base_manifest["config"]["model"]
    # training from it starts where the export left off: the same first batch costs less than from scratch
    tuned = train(world, tmp_path / "tuned", f"init={base.export_dir}", "train.steps=2", *common)
    assert losses(tuned.history)[0] < 0.95 * losses(base.history)[0]
    # the layout's loss weights are the run's, not the export's: the same first batch weighs differently
    capsys.readouterr()
    reweighted = train(world, tmp_path / "reweighted", f"init={base.export_dir}", "train.steps=2",
                       "layout.action_weight=0.1", *common)
    assert "action_weight" not in capsys.readouterr().out
    layout = json.loads((reweighted.export_dir / "manifest.json").read_text())["config"]["layout"]
    assert layout == {**base_manifest["config"]["layout"], "action_weight": 0.1}
    assert losses(reweighted.history)[0] != losses(tuned.history)[0]
    # another tokenizer's codes
    torch.manual_seed(1)
    other = VisionTokenizer(to_dataclass(TokenizerConfig, compose_cfg("train", "tokenizer=tiny").tokenizer))
    other.save(tmp_path / "other_tokenizer")
    with pytest.raises(ValueError, match="world_model.tokenizer=<folder>"):
        train(world, tmp_path / "x", f"init={base.export_dir}", f"world_model.tokenizer={tmp_path / 'other_tokenizer'}",
              f"data.token_cache={tmp_path / 'cache2'}")
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        train(world, tmp_path / "y", f"init={tmp_path}")
    # a dataset of the export's whose action range moved: a hundredth of a bin passes, half a bin fails
    moved = tmp_path / "moved"
    shutil.copytree(base.export_dir, moved)
    file = moved / "binners" / "widowx_pick_place.json"
    saved = ActionBinner.load(file)
    for shift, fails in ((0.01, False), (0.5, True)):
        ActionBinner(saved.low + shift * (saved.high - saved.low) / saved.num_bins, saved.high,
                     saved.num_bins).save(file)
        args = (f"init={moved}", "train.steps=1", *common)
        if fails:
            with pytest.raises(ValueError, match="widowx_pick_place: its action binner"):
                train(world, tmp_path / "z", *args)
        else:
            train(world, tmp_path / "ok", *args)


def test_input_noise_corrupts_only_image_codes_at_the_drawn_rates():
    layout = SequenceLayout(LayoutConfig(action_bins=16, actions_per_frame=2, pad_vocab_to=1), load_text_tokenizer(),
                            64, (4, 4))
    rng = np.random.default_rng(0)
    samples = [layout.dynamics("fold the cloth", rng.integers(0, 64, (6, 4, 4)), rng.integers(0, 16, (12, 3)))
               for _ in range(3)]
    packed = layout.pack(samples, max_len=sum(len(s) for s in samples))
    clean = torch.as_tensor(packed.tokens)
    noisy = corrupt_image_inputs(layout, packed, 0.5, seeded_generator(0, 7))
    assert torch.equal(noisy, corrupt_image_inputs(layout, packed, 0.5, seeded_generator(0, 7)))  # a pure function
    assert not torch.equal(noisy, corrupt_image_inputs(layout, packed, 0.5, seeded_generator(0, 8)))
    changed = noisy != clean
    in_image = torch.zeros_like(changed)
    for row, a, b in packed.image_spans.tolist():
        in_image[row, a:b] = True
    is_code = (clean >= layout.vision.start) & (clean < layout.vision.stop)
    assert changed.any() and not (changed & ~(in_image & is_code)).any()  # EOLs, text, actions untouched
    assert ((noisy[changed] >= layout.vision.start) & (noisy[changed] < layout.vision.stop)).all()
    rate = float(changed.sum()) / float(is_code.sum())
    assert 0.1 < rate < 0.5 * 0.5 + 0.05  # E = max/2 x (1 - 1/K) of the codes
    assert torch.equal(corrupt_image_inputs(layout, packed, 0.0, seeded_generator(0, 7)), clean)


def test_changed_weight_scales_exactly_the_codes_that_moved():
    layout = SequenceLayout(LayoutConfig(action_bins=16, actions_per_frame=2, pad_vocab_to=1), load_text_tokenizer(),
                            64, (4, 4))
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 64, (1, 4, 4)), 3, axis=0)  # (3, 4, 4): a static scene ...
    frames[1, 0, :3] = (frames[0, 0, :3] + 1) % 64  # ... where 3 cells change, then 2 of them again
    frames[2] = frames[1]
    frames[2, 0, :2] = (frames[1, 0, :2] + 5) % 64
    packed = layout.pack([layout.dynamics("fold the cloth", frames, rng.integers(0, 16, (4, 3)))], max_len=200)
    tokens, doc_ids = torch.as_tensor(packed.tokens), torch.as_tensor(packed.doc_ids)
    weights = torch.as_tensor(packed.weights)
    hints = layout.frame_hints(tokens, doc_ids)
    out = changed_code_weights(layout, tokens, hints, weights, 3.0)
    scaled = out != weights
    assert int(scaled.sum()) == 3 + 2  # the first image has no previous one: nothing of it moved
    assert torch.equal(out[scaled], 3.0 * weights[scaled]) and (weights[scaled] == 0.5).all()  # vision weight
    (a1, b1), (a2, b2) = packed.image_spans[1:, 1:].tolist()
    assert int(scaled[0, a1:b1].sum()) == 3 and int(scaled[0, a2:b2].sum()) == 2
    assert torch.equal(changed_code_weights(layout, tokens, hints, weights, 1.0), weights)


def test_input_noise_trains_and_resumes_exactly(world, tmp_path):
    """world_model.input_noise: the model reads corrupted image codes (a pure function of the batch
    index) and predicts the clean tokens; an interrupted run resumes onto the same loss curve."""
    noise = ("train.steps=6", "train.save_every=100", "train.eval_every=0", "world_model.input_noise=0.3")
    clean = train(world, tmp_path / "clean", *noise[:-1])
    full = train(world, tmp_path / "full", *noise)
    assert losses(full.history)[0] > losses(clean.history)[0]  # same weights, same batch: noisy inputs cost
    first = train(world, tmp_path / "cut", *noise, "train.stop_after=3")
    rest = train(world, tmp_path / "cut", *noise, "resume=true")
    assert losses(first.history) + losses(rest.history) == losses(full.history)
    with pytest.raises(ValueError, match=r"world_model.input_noise must be in \[0, 1\)"):
        train(world, tmp_path / "bad", "world_model.input_noise=1.5")
    with pytest.raises(ValueError, match="world_model.changed_weight must be a finite factor > 0"):
        train(world, tmp_path / "bad", "world_model.changed_weight=0")
    weighted = train(world, tmp_path / "weighted", *noise[:-1], "world_model.changed_weight=4")
    assert losses(weighted.history)[0] != losses(clean.history)[0]  # reweighted from the first batch


def test_two_gloo_ranks_agree_with_one_process(world, tmp_path, run_group):
    """torchrun --nproc_per_node=2 (gloo, CPU): 2 steps of 2 mixture batches, one per rank."""
    train(world, tmp_path / "warm", "train.steps=1")  # fills the token cache before the ranks start
    exact = "world_model.export_dtype=float32"  # compare the weights before any rounding
    single = train(world, tmp_path / "one", "train.steps=2", "train.eval_every=0", exact)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "emu_world.train", *overrides(world, tmp_path / "two", "train.steps=2", "train.eval_every=0",
                                               "train.threads=2", exact)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_group(cmd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ddp = [r["loss"] for r in records if "loss" in r and "eval" not in r]
    np.testing.assert_allclose(ddp, losses(single.history), rtol=1e-5, atol=1e-6)
    a = load_file(str(tmp_path / "one" / "world_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "world_model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def torchrun(run_group, world, run_dir: Path, *extra: str) -> list[float]:
    """``torchrun --nproc_per_node=2 -m emu_world.train`` (gloo, CPU); the losses it logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "emu_world.train", *overrides(world, run_dir, "train.threads=2", *extra)]
    proc = run_group(cmd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "eval" not in r]


def test_fsdp_ranks_agree_with_one_process_and_share_checkpoints(world, tmp_path, run_group):
    """train.parallel=fsdp under torchrun (FSDP2 on gloo): the same losses and weights as one process, and
    its checkpoints hold full states: an FSDP run resumes a single-process checkpoint and the other way round."""
    train(world, tmp_path / "warm", "train.steps=1")  # fills the token cache before the ranks start
    common = ("train.steps=3", "train.eval_every=0", "train.save_every=100", "world_model.export_dtype=float32")
    single = losses(train(world, tmp_path / "one", *common).history)
    # FSDP for steps 1-2 (checkpoint), then one process resumes for step 3
    fsdp = torchrun(run_group, world, tmp_path / "a", *common, "train.parallel=fsdp", "train.stop_after=2")
    rest = losses(train(world, tmp_path / "a", *common, "resume=true").history)
    np.testing.assert_allclose(fsdp + rest, single, rtol=1e-5, atol=1e-6)
    # one process for step 1 (checkpoint), then FSDP resumes for steps 2-3 and exports
    first = losses(train(world, tmp_path / "b", *common, "train.stop_after=1").history)
    fsdp = torchrun(run_group, world, tmp_path / "b", *common, "train.parallel=fsdp", "resume=true")
    np.testing.assert_allclose(first + fsdp[-2:], single, rtol=1e-5, atol=1e-6)
    a = load_file(str(tmp_path / "one" / "world_model" / "model.safetensors"))
    for run in ("a", "b"):
        b = load_file(str(tmp_path / run / "world_model" / "model.safetensors"))
        assert set(b) == set(a)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_bad_settings_fail_with_the_fix(world, tmp_path):
    with pytest.raises(ValueError, match="python -m emu_world.data.tokenize"):  # an empty cache, not filled
        train(world, tmp_path / "a", "world_model.tokenize=false", f"data.token_cache={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="multiple of data.rows"):
        train(world, tmp_path / "b", "train.batch_size=3")
    with pytest.raises(FileNotFoundError, match="neither a LeRobot dataset"):
        train(world, tmp_path / "c", f"dataset.root={tmp_path}")
    with pytest.raises(ValueError, match="eval_batches"):
        train(world, tmp_path / "d", "world_model.eval_batches=0")
    with pytest.raises(FileNotFoundError, match="resume=true"):
        train(world, tmp_path / "e", "resume=true")
    with pytest.raises(ValueError, match="train.parallel must be ddp or fsdp"):
        train(world, tmp_path / "f", "train.parallel=zero3")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="use train.device=cpu"):
            train(world, tmp_path / "g", "train.device=cuda")


def test_run_group_kills_the_whole_process_group_on_timeout(run_group, tmp_path):
    """The torchrun tests' runner (conftest): a child the command started does not outlive the timeout."""
    marker = tmp_path / "alive"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(["sh", "-c", f"(sleep 1; touch {marker}) & sleep 30"], timeout=0.3)
    time.sleep(1.5)
    assert not marker.exists()  # the background child was killed with its parent
    assert run_group(["sh", "-c", "echo out; echo err >&2"], timeout=10).stdout == "out\n"
