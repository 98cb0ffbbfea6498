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
and the loop (``train.*``) are this run's, exactly as in :mod:`emu_world.train.world_model`, whose
pieces are reused: config parsing, token cache, batch schedule, checkpoint modules, export.

Loss (:func:`emu_world.models.dida.dida_loss`): the layout-weighted next-token CE on the clean tokens
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

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from emu_world.config import to_dataclass
from emu_world.data.sequences import HeldoutMetrics, MixtureDataset
from emu_world.models.dida import (
    NoiseConfig,
    NoisePath,
    SamplerConfig,
    build_dida_batch,
    dida_loss,
    noisy_copy_scores,
    tokenizer_codebook,
)
from emu_world.models.export import WorldModelExport
from emu_world.models.weights import check_export_dtype
from emu_world.models.world_model import WORLD_MODEL_EXPORT_DTYPES, WorldModel
from emu_world.train.checkpoint import LoadedCheckpoint
from emu_world.train.world_model import (
    WorldModelStage,
    adopt_init,
    init_ignored,
    read_init,
)

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


# ----------------------------------------------------------------------------- loop pieces


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


# ----------------------------------------------------------------------------- the stage


class DidaStage(WorldModelStage):
    """``stage=dida``: the world-model stage started from ``init`` (its weights, model and layout),
    with the DiDA loss, the noisy-copy evaluation (also before the first step) and the DiDA manifest."""

    name = "dida"
    section_name = "dida"
    logged = LOGGED

    def __init__(self, cfg: DictConfig):
        self.stage = to_dataclass(DidaStageConfig, cfg.dida)
        self.init = read_init(cfg, self.name)
        self.ignored = init_ignored(cfg, self.init)
        if self.stage.tokenizer is None:  # the init export's tokenizer (code identity checked either way)
            self.stage = replace(self.stage, tokenizer=str(self.init.tokenizer_path))
        self.setup(adopt_init(cfg, self.init), self.stage)
        self.before: dict[str, Any] = {}

    def build(self, resuming: bool) -> None:
        super().build(resuming)
        codebook = tokenizer_codebook(self.tokenizer) if self.stage.noise.path == "metric" else None
        self.noise = NoisePath(self.stage.noise, self.layout.codebook_size, codebook)
        self.log(f"dida: adapting {self.init.path}, {self.stage.images_per_row} noisy image(s) of "
                 f"{self.layout.image_span_len} tokens per row")

    def make_model(self) -> WorldModel:
        return self.init.load_model(self.layout)  # checks the layout spec

    def restore(self, loaded: LoadedCheckpoint) -> None:
        self.before = loaded.state.get("metrics_before", {})

    def begin(self) -> dict[str, Any] | None:
        if self.heldout is None:
            return None
        self.before = self.evaluate()  # the AR export, noisy copies included
        return self.before

    def batch_loss(self, model: WorldModel, data: MixtureDataset, b: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The AR loss on the clean tokens + ``dida.weight`` x the noisy copies' CE of mixture batch ``b``."""
        stage = self.stage
        batch = build_dida_batch(data.layout, data.batch(b).packed, self.noise, stage.images_per_row,
                                 (stage.seed, TRAIN_KEY, b), model.hint_embed is not None,
                                 action_slots=model.config.action_hints)
        return dida_loss(model, batch.to(model.device), stage.weight, data.layout)

    def evaluate(self) -> dict[str, Any] | None:
        if self.heldout is None:
            return None
        return evaluate(self.model, self.heldout, self.stage.eval_batches, self.stage, self.noise)

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "init": str(self.init.path), "metrics_before": self.before}

    def manifest_extra(self, train_seconds: float) -> dict[str, Any]:
        return manifest_extra(self.init, self.stage, self.before, train_seconds)


def manifest_extra(init: WorldModelExport, stage: DidaStageConfig, before: dict[str, float],
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
