"""DiDA: the training sequence (mask entry by entry on packed documents, shifted labels, positions and
hints, the noise path), the block pass against a full forward with the training mask, the sampler
against a scripted mock model (forward passes = K + prefill, seeds, temperature 0, valid streams,
the confidence schedule, guidance), and the stage and benchmark end to end on tiny configs
(the noisy-copy loss falls, exact resume, the export's manifest, the K-sweep JSON and picture)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from emu_world.bench import run_benchmark
from emu_world.bench.dida import decoders
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.models.dida import (
    IGNORE, DidaSampler, FrameDecodingConfig, NoiseConfig, NoisePath, SamplerConfig, build_dida_batch,
    frame_predictor, image_head,
)
from emu_world.models.export import WorldModelExport
from emu_world.models.generate import Sampling
from emu_world.models.layout import LayoutConfig, LayoutError, SampleKind, SequenceLayout
from emu_world.record import record
from emu_world.models.text_tokenizer import load_text_tokenizer
from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer
from emu_world.train import run_stage
from emu_world.train.dida import DidaStageConfig
from emu_world.train.checkpoint import find_checkpoint
from emu_world.models.world_model import WorldModel, WorldModelConfig

torch.set_num_threads(1)  # tiny tensors; the machine is shared

GRID = (2, 3)
K = 8
A = 3
TASK = "put the red block in the blue bowl"


@pytest.fixture(scope="module")
def layout() -> SequenceLayout:
    cfg = LayoutConfig(action_bins=16, actions_per_frame=2, max_text_tokens=24, pad_vocab_to=1)
    return SequenceLayout(cfg, load_text_tokenizer(), K, GRID)


def prompts(layout: SequenceLayout) -> dict[SampleKind, np.ndarray]:
    """A prompt of each kind that ends where the next image may start."""
    rng = np.random.default_rng(0)
    k = layout.config.actions_per_frame
    return {
        SampleKind.DYNAMICS: layout.dynamics(TASK, rng.integers(0, K, (2, *GRID)), rng.integers(0, 16, (2 * k, A)),
                                             end=False).tokens,  # ... f1 BOA a1 EOA
        SampleKind.PLAN: layout.plan(TASK, rng.integers(0, K, GRID), ["reach the block"], [], end=False).tokens,
        SampleKind.EXPLORATION: layout.exploration("a kitchen", rng.integers(0, K, (1, *GRID)), ["forward"],
                                                   end=False).tokens,
    }


class ScriptedCache:
    def __init__(self) -> None:
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length


class ScriptedModel(nn.Module):
    """Tests only: the sampler's interface with scripted logits, (n, V) per block position whatever
    the input (zeros: uniform); records every call and every block it is shown."""

    def __init__(self, layout: SequenceLayout, table: torch.Tensor):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a device for the sampler
        self.table = table  # (n, V)
        self.hint_embed = None
        self.vocab_size = layout.vocab_size
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.prefills, self.blocks = 0, []

    def new_cache(self) -> ScriptedCache:
        return ScriptedCache()

    def extend(self, tokens: torch.Tensor, cache: ScriptedCache, hints=None) -> torch.Tensor:
        cache.length += tokens.shape[1]
        self.prefills += 1
        return torch.zeros(tokens.shape[0], self.vocab_size)

    def refine_block(self, tokens: torch.Tensor, cache: ScriptedCache, hints=None) -> torch.Tensor:
        assert tokens.shape[1] == self.table.shape[0]
        self.blocks.append(tokens[0].clone())
        return self.table[None].expand(tokens.shape[0], -1, -1)


def scripted(layout: SequenceLayout, uniform: bool = False, seed: int = 0) -> ScriptedModel:
    n = layout.image_span_len
    table = torch.zeros(n, layout.vocab_size)
    if not uniform:
        table = torch.randn(n, layout.vocab_size, generator=torch.Generator().manual_seed(seed))
    return ScriptedModel(layout, table)


def uniform_noise(layout: SequenceLayout, schedule: str = "linear") -> NoisePath:
    return NoisePath(NoiseConfig("uniform", schedule), layout.codebook_size)


# ----------------------------------------------------------------------------- training sequences


def packed_batch(layout: SequenceLayout):
    """Row 0: two documents (a dynamics sample of 3 images, an exploration sample of 2) and padding;
    row 1: a plan sample of 2 images (first-fit packing)."""
    rng = np.random.default_rng(1)
    k = layout.config.actions_per_frame
    samples = [
        layout.dynamics(TASK, rng.integers(0, K, (3, *GRID)), rng.integers(0, 16, (2 * k, A))),
        layout.exploration("a kitchen", rng.integers(0, K, (2, *GRID)), ["forward"]),
        layout.plan(TASK, rng.integers(0, K, GRID), ["lift it"], rng.integers(0, K, (1, *GRID))),
    ]
    packed = layout.pack(samples, max_len=len(samples[0]) + len(samples[1]) + 3)
    assert packed.tokens.shape[0] == 2 and set(packed.doc_ids[0].tolist()) == {0, 1, -1}
    assert set(packed.doc_ids[1].tolist()) == {2, -1}
    return packed


def test_mask_is_causal_plus_intra_image_bidirectional_entry_by_entry(layout):
    packed = packed_batch(layout)
    db = build_dida_batch(layout, packed, uniform_noise(layout), images_per_row=3, seed=(0, 0), hints=True)
    R, L = packed.tokens.shape
    n, M = layout.image_span_len, 3
    assert db.tokens.shape == (R, L + M * n) and db.attention_mask.shape == (R, 1, L + M * n, L + M * n)
    doc = packed.doc_ids
    allowed = (db.attention_mask[:, 0] == 0).numpy()
    blocks = db.blocks.numpy()
    assert (blocks[0, :, 0] >= 0).all() and (blocks[1, :2, 0] >= 0).all() and blocks[1, 2, 0] == -1  # row 1: 2 images
    for r in range(R):
        for q in range(L + M * n):
            for key in range(L + M * n):
                if q < L:
                    expected = key < L and doc[r, q] == doc[r, key] and key <= q
                else:
                    slot = (q - L) // n
                    a = blocks[r, slot, 0]
                    if key >= L:
                        expected = (key - L) // n == slot
                    else:
                        expected = a >= 0 and doc[r, key] == doc[r, a] and key < a - 1
                assert allowed[r, q, key] == expected, (r, q, key)


def test_noisy_blocks_hold_shifted_labels_positions_and_hints(layout):
    packed = packed_batch(layout)
    db = build_dida_batch(layout, packed, uniform_noise(layout), images_per_row=2, seed=(0, 3), hints=True)
    L, n = packed.tokens.shape[1], layout.image_span_len
    clean_hints = layout.frame_hints(torch.as_tensor(packed.tokens), torch.as_tensor(packed.doc_ids))
    assert (clean_hints >= 0).any()  # later images do carry hints
    seen = 0
    for r in range(packed.tokens.shape[0]):
        for m, (a, b) in enumerate(db.blocks[r].tolist()):
            if a < 0:
                continue
            assert b - a == n
            s = L + m * n
            block, pos = db.tokens[r, s:s + n], db.position_ids[r, s:s + n]
            assert block[0] == layout.sot == packed.tokens[r, a - 1]
            for j in range(n):
                clean_in, clean_label = int(packed.tokens[r, a - 1 + j]), int(packed.tokens[r, a + j])
                assert pos[j] == packed.position_ids[r, a - 1 + j]
                assert db.hints[r, s + j] == clean_hints[r, a - 1 + j]
                if clean_in == layout.eol:
                    assert block[j] == layout.eol  # structure is never noised
                elif j > 0:
                    assert int(block[j]) in layout.vision
                expected = clean_label if clean_label in layout.vision else IGNORE
                assert db.labels[r, m * n + j] == expected
            seen += 1
    assert seen == 4
    assert db.noisy_codes == seen * GRID[0] * GRID[1]
    again = build_dida_batch(layout, packed, uniform_noise(layout), images_per_row=2, seed=(0, 3), hints=True)
    assert torch.equal(again.tokens, db.tokens)  # a pure function of the seed
    other = build_dida_batch(layout, packed, uniform_noise(layout), images_per_row=2, seed=(0, 4), hints=True)
    assert not torch.equal(other.tokens, db.tokens)


@pytest.mark.parametrize("path", ["uniform", "metric"])
def test_noise_path_keeps_clean_codes_at_t1_and_mixes_at_t0(path):
    codebook = torch.randn(K, 4, generator=torch.Generator().manual_seed(0))
    noise = NoisePath(NoiseConfig(path), K, codebook if path == "metric" else None)
    clean = torch.randint(0, K, (20_000,), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(noise.sample(clean, 1.0, gen), clean)
    kept = (noise.sample(clean, 0.0, gen) == clean).float().mean()
    assert abs(float(kept) - 1 / K) < 0.02  # pure noise: the clean code only by chance
    half = (noise.sample(clean, 0.5, gen) == clean).float().mean()
    assert 1 / K + 0.1 < float(half) < 0.99
    if path == "uniform":
        assert abs(float(half) - (0.5 + 0.5 / K)) < 0.02  # linear schedule: kept with 0.5, else uniform


@pytest.mark.parametrize("action_hints", [0, 6])
def test_block_pass_equals_a_full_forward_with_the_training_mask(layout, action_hints):
    """The sampler's cached block pass sees exactly what training's noisy block sees."""
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.preset("tiny", action_hints=action_hints), layout).eval()
    if action_hints:
        with torch.no_grad():
            torch.nn.init.normal_(model.action_mlp[2].weight, std=0.5)  # not the zero initial output
    rng = np.random.default_rng(0)
    sample = layout.dynamics(TASK, rng.integers(0, K, (2, *GRID)), rng.integers(0, 16, (4, A)))
    packed = layout.pack([sample], max_len=len(sample))
    db = build_dida_batch(layout, packed, uniform_noise(layout), images_per_row=2, seed=(0, 0), hints=True,
                          action_slots=action_hints)
    if action_hints:
        assert db.hints.shape == db.tokens.shape + (2 + action_hints,)
    L, n = db.clean_len, db.block_len
    with torch.no_grad():
        full = model.logits(db.tokens, position_ids=db.position_ids, attention_mask=db.attention_mask,
                            hints=db.hints)  # (1, T, V)
        for m, (a, _) in enumerate(db.blocks[0].tolist()):
            cache = model.new_cache()
            model.extend(db.tokens[:, :a - 1], cache, db.hints[:, :a - 1])
            s = L + m * n
            block = model.refine_block(db.tokens[:, s:s + n], cache, db.hints[:, s:s + n])  # (1, n, V)
            torch.testing.assert_close(block, full[:, s:s + n], atol=1e-5, rtol=1e-5)
            assert cache.get_seq_length() == a - 1  # cropped back to the prompt
        plain = model.logits(db.tokens[:, :L], torch.as_tensor(packed.doc_ids))  # clean part = the AR model
    torch.testing.assert_close(full[:, :L], plain, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("update", ["renoise", "confidence"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_forward_passes_equal_k_plus_the_prefill(layout, update, steps):
    model = scripted(layout, uniform=True)
    sampler = DidaSampler(model, layout, uniform_noise(layout), SamplerConfig(steps, update), Sampling(1.0))
    frame = sampler.sample(prompts(layout)[SampleKind.DYNAMICS], seed=0)
    assert frame.forward_passes == steps + 1 and frame.steps == steps
    assert model.prefills == 1 and len(model.blocks) == steps
    guided = DidaSampler(scripted(layout, uniform=True), layout, uniform_noise(layout), SamplerConfig(steps, update),
                         Sampling(1.0), cfg_scale=2.0)
    assert guided.sample(prompts(layout)[SampleKind.DYNAMICS], seed=0).forward_passes == 2 * (steps + 1)


def test_same_seed_same_frame_and_the_seed_matters_when_sampling(layout):
    prefix = prompts(layout)[SampleKind.DYNAMICS]
    sampler = DidaSampler(scripted(layout, uniform=True), layout, uniform_noise(layout), SamplerConfig(4),
                          Sampling(1.0))
    a, b = sampler.sample(prefix, seed=7), sampler.sample(prefix, seed=7)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({sampler.sample(prefix, seed=s).codes.tobytes() for s in range(5)}) > 1


@pytest.mark.parametrize("update", ["renoise", "confidence"])
def test_temperature_zero_is_deterministic_argmax(layout, update):
    model = scripted(layout, seed=3)
    sampler = DidaSampler(model, layout, uniform_noise(layout), SamplerConfig(3, update), Sampling(0.0))
    offsets = torch.as_tensor(layout.code_offsets)
    argmax = model.table[offsets, layout.vision.start:layout.vision.stop].argmax(-1).reshape(GRID).numpy()
    for seed in range(3):  # fixed logits: the frame is their argmax whatever the noise
        np.testing.assert_array_equal(sampler.sample(prompts(layout)[SampleKind.DYNAMICS], seed=seed).codes, argmax)


@pytest.mark.parametrize("kind", list(SampleKind))
@pytest.mark.parametrize("update", ["renoise", "confidence"])
def test_generated_streams_parse(layout, kind, update):
    prefix = prompts(layout)[kind]
    sampler = DidaSampler(scripted(layout, uniform=True), layout, uniform_noise(layout), SamplerConfig(2, update),
                          Sampling(1.0, top_k=3), action_dim=A)
    for seed in range(3):
        frame = sampler.sample(prefix, seed=seed)
        assert np.array_equal(frame.tokens[:len(prefix)], prefix)
        parsed = layout.parse(frame.tokens, complete=False, action_dim=A)
        assert parsed.kind == kind
        np.testing.assert_array_equal(parsed.frames[-1], frame.codes)
        assert frame.codes.shape == GRID and frame.codes.min() >= 0 and frame.codes.max() < K
    after_image = layout.dynamics(TASK, np.zeros((1, *GRID), dtype=np.int64), np.zeros((0, A), dtype=np.int64),
                                  end=False).tokens  # an action span must come first
    with pytest.raises(LayoutError, match="after an action span"):
        image_head(layout, after_image)


class RecordingNoise(NoisePath):
    """The uniform path, recording the time of every draw."""

    def __init__(self, layout: SequenceLayout):
        super().__init__(NoiseConfig("uniform", "linear"), layout.codebook_size)
        self.times: list[float] = []

    def sample(self, clean, t, gen):
        self.times.append(float(t))
        return super().sample(clean, t, gen)


def test_warm_start_begins_from_the_previous_image_and_runs_t0_to_one(layout):
    prefix = prompts(layout)[SampleKind.DYNAMICS]  # ... f0 BOA a EOA f1 BOA a EOA: f2 follows f1
    previous = torch.as_tensor(layout.parse(prefix, complete=False, action_dim=A).frames[-1].reshape(-1))
    model = scripted(layout, seed=2)
    model.hint_embed = True  # the sampler reads frame hints from hints_for, as for a real model
    model.hints_for = lambda tokens, doc_ids=None: layout.frame_hints(tokens, doc_ids)
    where = torch.as_tensor(layout.code_offsets + 1)  # block positions of the codes
    for t0, steps in ((0.9999, 1), (0.5, 2)):
        noise, model.blocks = RecordingNoise(layout), []
        sampler = DidaSampler(model, layout, noise, SamplerConfig(steps, "renoise", "previous", t0), Sampling(0.0))
        frame = sampler.sample(prefix, seed=0)
        assert frame.forward_passes == steps + 1
        assert noise.times == pytest.approx([t0 + (1 - t0) * k / steps for k in range(steps)])
        first = model.blocks[0][where] - layout.vision.start
        if t0 > 0.999:  # nothing re-drawn: the first block is the previous image
            assert torch.equal(first, previous)
        else:  # about half kept at t0 = 0.5
            assert 0.2 < float((first == previous).float().mean()) < 0.8
    # an image without a previous one (a plan's observation) starts from noise at t = 0
    plan = layout.plan(TASK, np.zeros(GRID, dtype=np.int64), [], [], end=False)
    first_image = plan.tokens[:int(plan.image_spans[0][0]) - len(layout.meta_ids) - 2]  # BOS PLAN task
    noise = RecordingNoise(layout)
    DidaSampler(model, layout, noise, SamplerConfig(2, "renoise", "previous"), Sampling(0.0)).sample(
        first_image, seed=0)
    assert noise.times == [0.5]  # only the re-noise to t_1 = 1/2
    # so does a model without frame hints
    noise = RecordingNoise(layout)
    DidaSampler(scripted(layout), layout, noise, SamplerConfig(2, start="previous")).sample(prefix)
    assert noise.times == [0.5]
    older = WorldModelExport(Path("."), {"dida": {"sampler": {"steps": 2, "update": "renoise"}}})
    assert older.sampler_config().start == "noise"  # older
    assert WorldModelExport(Path("."), {}).sampler_config().start == "previous"
    with pytest.raises(ValueError, match="start_time must be in"):
        SamplerConfig(2, start="previous", start_time=1.0)
    with pytest.raises(ValueError, match="start must be one of"):
        SamplerConfig(2, start="last")


def test_confidence_update_commits_codes_on_the_cosine_schedule(layout):
    model = scripted(layout, seed=5)
    steps, hw = 4, GRID[0] * GRID[1]
    sampler = DidaSampler(model, layout, uniform_noise(layout), SamplerConfig(steps, "confidence"), Sampling(0.0))
    frame = sampler.sample(prompts(layout)[SampleKind.DYNAMICS], seed=1)
    where = torch.as_tensor(layout.code_offsets + 1)  # block positions of the codes
    inputs = [b[where] for b in model.blocks]  # (hw,) codes shown at each step
    final = torch.as_tensor(frame.codes.reshape(-1)) + layout.vision.start
    committed_before = None
    for k in range(1, steps):
        target = math.ceil(hw * (1 - math.cos(0.5 * math.pi * k / steps)))
        committed = inputs[k] == final  # committed codes are final (others are random, equal by chance)
        assert int(committed.sum()) >= target
        if committed_before is not None:
            assert bool((committed | ~committed_before).all())  # once committed, never changed
        committed_before = committed


def test_frame_predictor_chooses_ar_or_dida(layout):
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.preset("tiny"), layout).eval()
    prefix = prompts(layout)[SampleKind.DYNAMICS]
    ar = frame_predictor(model, layout, FrameDecodingConfig("ar"), action_dim=A)
    dida = frame_predictor(model, layout, FrameDecodingConfig("dida", dida=SamplerConfig(3)), A, uniform_noise(layout))
    a, d = ar(prefix, seed=0), dida(prefix, seed=0)
    assert a.codes.shape == d.codes.shape == GRID
    assert d.forward_passes == 4 and a.forward_passes == GRID[0] * GRID[1]
    for out in (a, d):
        np.testing.assert_array_equal(layout.parse(out.tokens, complete=False, action_dim=A).frames[-1], out.codes)
    with pytest.raises(ValueError, match="noise path"):
        frame_predictor(model, layout, FrameDecodingConfig("dida"), A)
    with pytest.raises(ValueError, match="decoding must be one of"):
        FrameDecodingConfig("parallel")


def test_config_section_validates():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["stage=dida"])
    stage = to_dataclass(DidaStageConfig, cfg.dida)
    assert stage.noise == NoiseConfig() and stage.sampler == SamplerConfig()
    with pytest.raises(ValueError, match="images_per_row"):
        DidaStageConfig(images_per_row=0)
    with pytest.raises(ValueError, match="noise.path"):
        DidaStageConfig(noise={"path": "gaussian"})
    with pytest.raises(ValueError, match="steps must be in 1..64"):
        SamplerConfig(0)


# ----------------------------------------------------------------------------- the stage and the benchmark


def compose_cfg(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny WidowX dataset (2 episodes of 32x32 frames), an untrained tiny tokenizer, and a tiny AR
    world model trained for a few steps and exported (the DiDA stage's init)."""
    tmp = tmp_path_factory.mktemp("dida")
    torch.manual_seed(0)
    tok = VisionTokenizer(to_dataclass(TokenizerConfig, compose_cfg("train", "tokenizer=tiny").tokenizer))
    tok.save(tmp / "tokenizer")
    cfg = compose_cfg("record", "env=widowx_pick_place", "env.max_episode_steps=40", "env.image_size=32")
    record(to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), tmp / "data" / "widowx_pick_place",
           "test/widowx_pick_place", episodes=2, seed=0, keep_failures=True, progress=False)
    paths = {"data": tmp / "data", "tokenizer": tmp / "tokenizer", "cache": tmp / "cache"}
    ar = run_stage(compose_cfg("train", "stage=world_model", "experiment=tiny_world_model",
                               f"dataset.root={paths['data']}", f"world_model.tokenizer={paths['tokenizer']}",
                               f"data.token_cache={paths['cache']}", f"run_dir={tmp / 'ar'}", "train.threads=1",
                               "train.steps=6", "train.eval_every=0"))
    return {**paths, "init": ar.export_dir}


def adapt(world, run_dir: Path, *extra: str):
    return run_stage(compose_cfg("train", "stage=dida", "experiment=tiny_dida", f"init={world['init']}",
                                 f"dataset.root={world['data']}", f"data.token_cache={world['cache']}",
                                 f"run_dir={run_dir}", "train.threads=1", *extra))


def test_tiny_adaptation_lowers_the_noisy_copy_loss_and_exports(world, tmp_path):
    result = adapt(world, tmp_path / "run", "train.steps=24", "train.eval_every=12")
    ce = [h["dida/ce"] for h in result.history]
    assert len(ce) == 24 and all(np.isfinite(ce)) and all(np.isfinite([h["ar/loss"] for h in result.history]))
    assert np.mean(ce[-4:]) < 0.85 * np.mean(ce[:3])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]
    for key in ("loss", "frame_acc", "dida/ce", "dida/acc", "loss/dynamics"):
        assert key in evals[-1]["eval"]
    assert evals[-1]["eval"]["dida/ce"] < evals[0]["eval"]["dida/ce"]
    out = result.export_dir
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "dida" and manifest["init"]["path"] == str(world["init"])
    assert manifest["metrics_before"] == evals[0]["eval"] and manifest["metrics"] == evals[-1]["eval"]
    assert manifest["dida"]["noise"] == {"path": "uniform", "schedule": "linear", "metric_c": 3.0, "metric_alpha": 0.9}
    assert manifest["quality"] == {**manifest["quality"], "ar": None, "dida": None}  # filled by the bench
    assert manifest["init"]["train_seconds"] > 0 and manifest["dida"]["adaptation_vs_ar_training"] > 0
    assert (out / "binners" / "widowx_pick_place.json").is_file()
    with pytest.raises(ValueError, match="init=<folder>"):
        adapt({**world, "init": ""}, tmp_path / "none")


def test_resume_reproduces_the_uninterrupted_adaptation(world, tmp_path):
    """With the codebook-metric noise path (the tokenizer's code vectors)."""
    common = ("train.steps=6", "train.save_every=100", "train.eval_every=0", "dida.noise.path=metric")
    full = adapt(world, tmp_path / "full", *common)
    first = adapt(world, tmp_path / "cut", *common, "train.stop_after=3")
    assert first.step == 3 and find_checkpoint(tmp_path / "cut") is not None
    with pytest.raises(FileExistsError, match="resume=true"):
        adapt(world, tmp_path / "cut", *common)
    rest = adapt(world, tmp_path / "cut", *common, "resume=true")
    assert [h["loss"] for h in first.history + rest.history] == [h["loss"] for h in full.history]
    a = load_file(str(tmp_path / "full" / "world_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "world_model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_adaptation_agrees_with_one_process(world, tmp_path, run_group):
    """train.parallel=fsdp under torchrun (FSDP2, 2 gloo ranks; logits() registered as an FSDP entry point):
    the same DiDA losses and exported weights as one process."""
    common = ("train.steps=2", "train.eval_every=0", "train.save_every=100", "dida.export_dtype=float32")
    single = [h["loss"] for h in adapt(world, tmp_path / "one", *common).history]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "emu_world.train",
           "stage=dida", "experiment=tiny_dida", f"init={world['init']}", f"dataset.root={world['data']}",
           f"data.token_cache={world['cache']}", f"run_dir={tmp_path / 'two'}", "train.threads=2", *common,
           "train.parallel=fsdp"]
    proc = run_group(cmd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in records if "loss" in r and "eval" not in r], single, rtol=1e-5)
    a = load_file(str(tmp_path / "one" / "world_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "world_model" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_benchmarks_run_on_the_adapted_export(world, tmp_path):
    export = adapt(world, tmp_path / "run", "train.steps=2", "train.eval_every=0").export_dir
    common = [f"checkpoint={export}", f"tokenizer={world['tokenizer']}", "tasks=[widowx_pick_place]", "episodes=1",
              "starts=1", "max_episode_steps=12", "threads=1"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "bench"), version_base="1.3"):
        cfg = compose(config_name="dida", overrides=[*common, "horizons=[1,2]", "steps=[1,2]", "default_steps=2",
                                                     "record=true", f"output={tmp_path / 'dida' / 'bench.json'}"])
        summary = run_benchmark("dida", cfg)
        wm = compose(config_name="world_model", overrides=[*common, "horizons=[1,2]", "decoding=dida", "dida.steps=2",
                                                           "picture=true", "throughput.steps=0",
                                                           f"output={tmp_path / 'wm' / 'bench.json'}"])
        wm_summary = run_benchmark("world_model", wm)
    assert summary["dida_adapted"] and summary["default_steps"] == 2
    assert list(summary["sweep"]) == ["ar", "K=1", "K=2"]
    assert summary["sweep"]["K=2"]["forward_passes_per_frame"] == 3
    for key in ("speedup_vs_ar", "psnr_gap_db", "psnr_gap_db_2", "sec_per_frame_ar", "ceiling_psnr_1"):
        assert np.isfinite(summary[key]), key
    assert summary["psnr_gap_db"] == pytest.approx(summary["psnr_1_ar"] - summary["psnr_1_dida"], abs=1e-3)
    assert Path(summary["picture"]).is_file()
    assert json.loads((tmp_path / "dida" / "bench.json").read_text())["speedup_vs_ar"] == summary["speedup_vs_ar"]
    quality = json.loads((Path(export) / "manifest.json").read_text())["quality"]  # record=true
    assert quality["task"] == "widowx_pick_place" and quality["dida"]["steps"] == 2
    assert quality["dida"]["start"] == "previous"  # the adaptation recorded configs/train.yaml's sampler
    assert quality["ar"]["psnr_1"] == summary["sweep"]["ar"]["psnr_1"]
    assert quality["dida"]["psnr_2"] == summary["sweep"]["K=2"]["psnr_2"] and "bench" in quality["command"]
    assert wm_summary["frame_decoding"] == "dida K=2 (renoise, start=previous)" and np.isfinite(wm_summary["psnr_1"])
    assert Path(wm_summary["picture"]).name == "strip.png" and Path(wm_summary["picture"]).is_file()


@pytest.mark.parametrize("update", [None, "renoise", "confidence"])
def test_bench_decoders_take_the_update_override_or_the_exports(update):
    # `update` is also a DictConfig method name: the override must be read as a key
    overrides = ["steps=[1,2]"] + ([f"update={update}"] if update else [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "bench"), version_base="1.3"):
        cfg = compose(config_name="dida", overrides=overrides)
    manifest = {"dida": {"sampler": {"steps": 2, "update": "confidence"}}}
    methods, default_k = decoders(cfg, WorldModelExport(Path("."), manifest), Sampling())
    assert default_k == 2 and list(methods) == ["ar", "K=1", "K=2"]
    assert {m.dida.update for name, m in methods.items() if name != "ar"} == {update or "confidence"}
