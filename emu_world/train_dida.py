"""Training stage ``dida``: adapt an AR world-model export to parallel image decoding (DiDA).

    python -m emu_world.train stage=dida init=checkpoints/world_model dataset.root=datasets \\
        train.steps=600 train.lr=5e-4 train.warmup_steps=50 dida.export_dir=outputs/train/dida/world_model
    python -m emu_world.train stage=dida init=... resume=true          # continue exactly after an interruption
    torchrun --nproc_per_node=2 -m emu_world.train stage=dida init=... dataset.root=datasets

What it starts from. ``init`` is a folder written by ``train stage=world_model`` (or an earlier DiDA
run): its weights, and from its ``manifest.json`` the model and layout configs (they replace the
composed ``model``/``layout``: the weights fix them), the vision tokenizer (``dida.tokenizer``
overrides the path; its identity must match) and the action binners (the datasets' binners must
equal the export's, so the action tokens keep their meaning). Data (``dataset.root``, ``data.*``)
and the loop (``train.*``) are this run's, exactly as in :mod:`emu_world.train_world_model`, whose
pieces are reused: config parsing, token cache, batch schedule, checkpoint modules, export.

Loss (:func:`emu_world.dida.dida_loss`): the layout-weighted next-token CE on the clean tokens
(the AR objective, so token-by-token decoding does not degrade) + ``dida.weight`` x the CE of the
noisy copies' shifted vision labels (``dida.images_per_row`` images per packed row, noise
``dida.noise``). The noisy copies of mixture batch ``b`` are a pure function of
``(dida.seed, b)``, so resuming restores them.

Evaluation (``train.eval_every``, at step 0 before any update, and at the end; one forward pass
per held-out batch): the world-model stage's teacher-forced metrics of the clean tokens (per-kind
loss, ``frame_acc``) and the noisy copies' ``dida/ce`` and ``dida/acc`` (argmax over the codes).
The step-0 numbers are the "before" of the issue's before/after.

Export: the world-model folder format (``python -m emu_world.bench world_model checkpoint=<it>``
and ``python -m emu_world.bench dida checkpoint=<it>`` read it), with ``manifest.json`` adding
``stage: dida``, ``init`` (path, command, metrics and training time of the AR export),
``dida`` (weight, images per row, noise path, sampler defaults, adaptation seconds and their ratio
to the AR training time, fine-tunes included), ``metrics_before`` (step 0), ``train_seconds_total``
(this run and every run the export started from) and ``quality`` (AR and DiDA frame quality:
null until ``python -m emu_world.bench dida`` is run on the export and recorded).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from emu_world.config import to_dataclass
from emu_world.data.sequences import HeldoutMetrics, MixtureDataset
from emu_world.dida import (
    NoiseConfig, NoisePath, SamplerConfig, build_dida_batch, dida_loss, noisy_copy_scores, tokenizer_codebook,
)
from emu_world.layout import SequenceLayout
from emu_world.tokenizer import check_same_codes, load_tokenizer
from emu_world.train_world_model import (
    InitExport, Parts, adopt_init, check_binners, check_run_dir, checkpoint_modules, export, parse_config,
    place_world_model, prepare_token_cache, read_init, step_batches, unsharded,
)
from emu_world.train_world_model import train_step as world_model_train_step
from emu_world.training import (
    DistInfo, LoopConfig, MetricLogger, TrainResult, cosine_lr, init_distributed,
    check_export_dtype, load_checkpoint, save_checkpoint, set_lr, teardown_distributed,
)
from emu_world.world_model import WORLD_MODEL_EXPORT_DTYPES, WorldModel

LOGGED = ("loss", "ar/loss", "ce/vision", "ce/text", "ce/action", "ce/structure", "dida/ce", "dida/acc")
TRAIN_KEY, EVAL_KEY = 0, 1  # the noisy copies of training batch b use seed (dida.seed, 0, b), held-out (.., 1, b)


@dataclass
class DidaStageConfig:
    """``dida:`` section of ``configs/train.yaml`` (the AR export to adapt is the top-level ``init``)."""

    weight: float = 1.0  # noisy-copy CE weight against the AR loss (1: equal)
    images_per_row: int = 2  # noisy copies appended per packed row (fewer when a row has fewer images)
    seed: int = 0  # which images, their times and noise: a pure function of (seed, batch index)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the export's default sampler
    tokenizer: str | None = None  # None: the init export's tokenizer path (code identity checked either way)
    tokenize: bool = True  # fill missing token-cache entries first
    eval_batches: int = 8  # held-out mixture batches per evaluation
    export_dir: str | None = None  # None: <run_dir>/world_model
    export_dtype: str = "float16"  # weights of the export: float16 | bfloat16 | float32 | int8 (training stays float32)

    def __post_init__(self) -> None:
        check_export_dtype(self.export_dtype, "dida.export_dtype", WORLD_MODEL_EXPORT_DTYPES)
        if isinstance(self.noise, dict):
            self.noise = NoiseConfig(**self.noise)
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig(**self.sampler)
        if not np.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"dida.weight must be a finite number > 0, got {self.weight}")
        if self.images_per_row < 1:
            raise ValueError(f"dida.images_per_row must be >= 1, got {self.images_per_row}")
        if self.eval_batches < 1:
            raise ValueError(f"dida.eval_batches must be >= 1, got {self.eval_batches}")


def stage_config(cfg: DictConfig, init: InitExport, stage: DidaStageConfig) -> DictConfig:
    """This run's config with the init export's model and layout (:func:`adopt_init`), and the
    ``world_model:`` section the reused world-model pieces read (tokenizer, token cache, eval batches,
    export dir) set from ``dida:``."""
    from emu_world.bench import resolve_path

    out = adopt_init(cfg, init)
    out.world_model.tokenizer = stage.tokenizer or str(resolve_path(init.manifest["tokenizer"]["path"]))
    out.world_model.tokenize = stage.tokenize
    out.world_model.eval_batches = stage.eval_batches
    out.world_model.export_dir = stage.export_dir
    out.world_model.export_dtype = stage.export_dtype
    return out


# ----------------------------------------------------------------------------- loop pieces


def train_step(model: WorldModel, opt: torch.optim.Optimizer, data: MixtureDataset, indices: list[int],
               stage: DidaStageConfig, noise: NoisePath, loop: LoopConfig, info: DistInfo) -> dict[str, float]:
    """One optimisation step over this rank's mixture batches ``indices`` (AR + noisy-copy loss): the
    world-model stage's step with the DiDA batch loss."""
    hints = model.hint_embed is not None

    def batch_loss(model: WorldModel, data: MixtureDataset, b: int) -> tuple[torch.Tensor, dict[str, float]]:
        packed = data.batch(b).packed  # (R, L)
        batch = build_dida_batch(data.layout, packed, noise, stage.images_per_row, (stage.seed, TRAIN_KEY, b), hints,
                                 action_slots=model.config.action_hints)
        return dida_loss(model, batch.to(model.device), stage.weight, data.layout)

    return world_model_train_step(model, opt, data, indices, loop, info, batch_loss, LOGGED)


@torch.no_grad()
def evaluate(model: WorldModel, heldout: MixtureDataset, num_batches: int, stage: DidaStageConfig,
             noise: NoisePath) -> dict[str, float]:
    """Held-out AR metrics of the clean tokens (:class:`HeldoutMetrics`) and the noisy copies' CE and
    accuracy, from one forward pass per batch (clean tokens never see the noisy ones, so their logits
    are the AR model's)."""
    model.eval()
    metrics = HeldoutMetrics()
    ce_sum, correct, count = 0.0, 0, 0
    hints = model.hint_embed is not None
    for b in range(num_batches):
        batch = heldout.batch(b)
        db = build_dida_batch(heldout.layout, batch.packed, noise, stage.images_per_row, (stage.seed, EVAL_KEY, b),
                              hints, action_slots=model.config.action_hints).to(model.device)
        logits = model.logits(db.tokens, position_ids=db.position_ids, attention_mask=db.attention_mask,
                              hints=db.hints)  # (R, T, V)
        metrics.update(logits[:, :db.clean_len], batch)
        ce, c, n = noisy_copy_scores(logits[:, db.clean_len:], db.labels, heldout.layout)
        ce_sum, correct, count = ce_sum + float(ce) * n, correct + c, count + n
    out = {k: round(float(v), 5) for k, v in metrics.result().items()}
    if count:
        out["dida/ce"] = round(ce_sum / count, 5)
        out["dida/acc"] = round(correct / count, 5)
    return out


# ----------------------------------------------------------------------------- the run


def run(cfg: DictConfig) -> TrainResult:
    """Adapt (or resume adapting) the AR export ``cfg.init`` described by the composed ``configs/train.yaml``."""
    stage = to_dataclass(DidaStageConfig, cfg.dida)
    init = read_init(cfg, "dida")
    cfg = stage_config(cfg, init, stage)
    parts = parse_config(cfg)
    info = init_distributed(parts.loop.threads, parts.loop.device)
    try:
        return _run(cfg, parts, stage, init, info)
    finally:
        teardown_distributed()


def _run(cfg: DictConfig, parts: Parts, stage: DidaStageConfig, init: InitExport, info: DistInfo) -> TrainResult:
    loop = parts.loop
    log = print if info.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir)
    per_step = loop.batch_size // parts.data.rows
    if per_step % info.world_size:
        raise ValueError(f"train.batch_size={loop.batch_size} gives {per_step} mixture batches of data.rows="
                         f"{parts.data.rows} per step, not divisible by the {info.world_size} torchrun ranks")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    resolved["data"]["datasets"] = [asdict(s) for s in parts.data.datasets]

    tokenizer = load_tokenizer(parts.stage.tokenizer)
    tokenizer_id = tokenizer.identity()
    check_same_codes(init.manifest["tokenizer"], tokenizer, f"the init export {init.path}",
                     "give that tokenizer's folder (or one with its codes) with dida.tokenizer=<folder>")
    ckpt_path = check_run_dir(cfg, run_dir, resolved, tokenizer_id, log)
    prepare_token_cache(parts, tokenizer, info, log)
    layout = SequenceLayout.from_config(parts.layout, tokenizer.codebook_size, tuple(tokenizer.grid))
    train_data = MixtureDataset(parts.data, layout, tokenizer_id, split="train")
    heldout = MixtureDataset(parts.data, layout, tokenizer_id, split="heldout") \
        if parts.data.heldout_fraction > 0 else None
    check_binners(train_data.binners, init)
    codebook = tokenizer_codebook(tokenizer) if stage.noise.path == "metric" else None
    noise = NoisePath(stage.noise, layout.codebook_size, codebook)

    model = WorldModel.load(init.path, layout)  # checks the layout spec
    sharded = place_world_model(model, loop, info)  # device; FSDP2 shards
    evaluating = info.is_main or sharded is not None  # sharded forwards need every rank
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, betas=tuple(loop.betas), weight_decay=loop.weight_decay)
    log(f"dida: adapting {init.path} ({model.num_parameters():,} parameters), {stage.images_per_row} noisy "
        f"image(s) of {layout.image_span_len} tokens per row, {per_step} batches x {parts.data.rows} rows per step")
    step, train_seconds, before = 0, 0.0, {}
    if ckpt_path is not None:
        loaded = load_checkpoint(ckpt_path, checkpoint_modules(model), {"model": opt}, sharded)
        step, train_seconds = loaded.step, float(loaded.state.get("train_seconds", 0.0))
        before = loaded.state.get("metrics_before", {})
        log(f"resumed from {ckpt_path} at step {step}")
    logger = MetricLogger(run_dir, info.is_main, truncate_after_step=step if ckpt_path is not None else None)
    if info.is_main and ckpt_path is None:
        logger.path.unlink(missing_ok=True)
    if evaluating and ckpt_path is None and heldout is not None:
        before = evaluate(model, heldout, stage.eval_batches, stage, noise)  # the AR export, noisy copies included
        logger.log({"step": 0, "eval": before})

    def save() -> None:
        save_checkpoint(run_dir, checkpoint_modules(model), {"model": opt}, step,
                        {"train_seconds": train_seconds, "tokenizer_id": tokenizer_id, "init": str(init.path),
                         "metrics_before": before}, resolved, sharded=sharded, write=info.is_main)

    history: list[dict[str, float]] = []
    start_step = step
    t_last = time.perf_counter()
    while step < loop.steps:
        t0 = time.perf_counter()
        lr = cosine_lr(step, loop.steps, loop.lr, loop.warmup_steps, loop.min_lr_ratio)
        set_lr(opt, lr)
        logs = train_step(model, opt, train_data, step_batches(step, per_step, info), stage, noise, loop, info)
        step += 1
        train_seconds += time.perf_counter() - t0
        record = {"step": step, "lr": lr, **logs}
        history.append(record)
        if step % loop.log_every == 0 or step == loop.steps:
            record["sec_per_step"] = (time.perf_counter() - t_last) / loop.log_every
            record["train_seconds"] = train_seconds
            t_last = time.perf_counter()
            logger.log({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})
        if heldout is not None and loop.eval_every > 0 and step % loop.eval_every == 0 and step < loop.steps \
                and evaluating:
            logger.log({"step": step, "eval": evaluate(model, heldout, stage.eval_batches, stage, noise)})
        stopping = loop.stop_requested(step, start_step)
        if step % loop.save_every == 0 or step == loop.steps or stopping:
            save()
        if stopping:
            log(f"stopping after {loop.stop_after} steps at step {step} (train.stop_after); resume=true continues")
            return TrainResult("dida", run_dir, step, history, None, None, train_seconds)

    final = export_dir = None
    if evaluating:
        final = evaluate(model, heldout, stage.eval_batches, stage, noise) if heldout is not None else {}
    plain = unsharded(model, sharded, layout, info)
    if info.is_main:
        logger.log({"step": step, "eval": final, "train_seconds": round(train_seconds, 1)})
        out = Path(stage.export_dir) if stage.export_dir else run_dir / "world_model"
        export_dir = export(plain, train_data, tokenizer, parts, resolved, final, train_seconds, info, out,
                            extra=manifest_extra(init, stage, before, train_seconds))
    return TrainResult("dida", run_dir, step, history, final, export_dir, train_seconds)


def manifest_extra(init: InitExport, stage: DidaStageConfig, before: dict[str, float],
                   train_seconds: float) -> dict[str, Any]:
    """What a DiDA export's manifest adds to the world-model stage's."""
    ar_seconds = init.total_seconds()  # the AR export's training, fine-tunes included
    ratio = round(train_seconds / ar_seconds, 4) if ar_seconds else None
    return {
        "stage": "dida",
        "init": init.record(),
        "dida": {"weight": stage.weight, "images_per_row": stage.images_per_row, "seed": stage.seed,
                 "noise": asdict(stage.noise), "sampler": asdict(stage.sampler),
                 "adaptation_seconds": round(train_seconds, 1), "adaptation_vs_ar_training": ratio},
        "metrics_before": before,
        "train_seconds_total": init.total_after(train_seconds),
        "quality": {"ar": None, "dida": None,
                    "note": "frame quality vs the simulator, AR and DiDA: `python -m emu_world.bench dida "
                            "checkpoint=<this folder>` measures it; record its JSON here"},
    }
