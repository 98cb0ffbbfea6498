"""Training stage ``world_model``: the decoder over mixed, packed token sequences of local datasets.

    python -m emu_world.train stage=world_model dataset.root=datasets [model=small] [data=default]
    python -m emu_world.train stage=world_model dataset.root=[datasets/aloha_fold,datasets/explore_room]
    torchrun --nproc_per_node=2 -m emu_world.train stage=world_model dataset.root=datasets
    python -m emu_world.train stage=world_model ... resume=true   # continue exactly after an interruption
    python -m emu_world.train stage=world_model init=checkpoints/world_model dataset.root=...  # fine-tune

Data: ``dataset.root`` (a dataset folder, a folder of datasets, or a list ``[a,b]``; Hydra keeps
only the last of repeated ``dataset.root=`` overrides) chooses the datasets; an entry of
``data.datasets`` with the same folder supplies that dataset's weight, tag and cameras (weight 1
otherwise). Frames are read as codes of the vision tokenizer ``world_model.tokenizer``: its token
cache is filled first (incrementally, ``emu_world.data.tokenize``; ``world_model.tokenize=false``
only checks it and names the command that fills it). The layout (vocabulary) is built from the
tokenizer's codebook size and grid and ``configs/layout``; the mixture of datasets and sample
kinds, the packing (images and action spans are never split) and the held-out split are
:class:`~emu_world.data.sequences.MixtureDataset`'s.

Steps. ``train.batch_size`` is the global number of packed rows per optimisation step: the
``G = batch_size / data.rows`` mixture batches ``step*G .. step*G+G-1`` (each a pure function of
(data.seed, index)), of which rank ``r`` of ``W`` takes ``r, r+W, ...`` and accumulates their
gradients; gradients are then averaged over ranks. The loss of a step is therefore the mean of
the G batches' losses whatever the number of ranks, and resuming at a step restores its batches.

The stage (:class:`WorldModelStage`, run by the shared loop :mod:`emu_world.train.loop`, which owns
the schedule, logging, checkpoints and resume): ``train_step`` (weighted next-token CE, gradient
accumulation, all-reduce, clipping, AdamW at the loop's learning rate), ``evaluate``
(per-kind held-out loss and next-frame token accuracy, :class:`HeldoutMetrics`, every
``train.eval_every`` steps and at the end), checkpoints (:mod:`emu_world.train.loop`: model,
optimizer, step, RNG; atomic, exact resume) and ``export`` (``WorldModel.save`` + the action
binners + ``manifest.json`` with the tokenizer identity).

Fine-tuning (``init=<export folder>``): the run starts from that export's weights (an int8 export
is dequantised) instead of a fresh model; its ``model`` and ``layout`` replace the composed ones
(the weights fix them; composed settings that differ are named in a warning) except the layout's
loss weights (``layout.action_weight`` and the like: loss, not vocabulary), the tokenizer must
give the export's codes (``tokenizer.check_same_codes``), and a dataset the export was trained on
must keep its action binner. Data, loss and loop are this run's, so the schedule starts over (set
``train.lr`` / ``train.warmup_steps`` for a fine-tune). The manifest adds ``init`` (the export's
path, command, metrics and training time) and ``train_seconds_total`` (this run and every run the
export started from).

Departure from Emu3.5: no classifier-free-guidance condition dropout yet (generation's image CFG
uses an unconditional prompt the model has not been trained on separately).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from emu_world.config import to_dataclass
from emu_world.data.frames import FrameDataConfig, resolve_roots
from emu_world.data.sequences import (
    DataConfig,
    DatasetSpec,
    HeldoutMetrics,
    MixtureDataset,
)
from emu_world.data.tokenize import tokenize_dataset
from emu_world.errors import UserError
from emu_world.models.dida import NoiseConfig, NoisePath, seeded_generator
from emu_world.models.export import WorldModelExport
from emu_world.models.layout import (
    HINT_CODE,
    ActionBinner,
    LayoutConfig,
    Packed,
    SequenceLayout,
)
from emu_world.models.tokenizer import ImageTokenizer, load_tokenizer
from emu_world.models.weights import check_export_dtype, load_state_checked
from emu_world.models.world_model import (
    WORLD_MODEL_EXPORT_DTYPES,
    WorldModel,
    WorldModelConfig,
    next_token_loss,
)
from emu_world.provenance import code_version, command_line
from emu_world.train.checkpoint import gather_states
from emu_world.train.distributed import (
    DistInfo,
    all_reduce_sum,
    average_gradients,
    place_model,
)
from emu_world.train.loop import LoopConfig, Stage, config_diffs, resolved_config

LOGGED = ("loss", "ce/vision", "ce/text", "ce/action", "ce/structure")  # averaged over micro-batches and ranks
BINNER_TOLERANCE = 0.1  # a re-recorded dataset may move its action range by this fraction of a bin (tokens keep their meaning)


@dataclass
class WorldModelStageConfig:
    """``world_model:`` section of ``configs/train.yaml``: stage-specific settings."""

    tokenizer: str = "checkpoints/tokenizer"  # the vision tokenizer folder whose codes the model reads
    tokenize: bool = True  # fill missing token-cache entries first (False: only check, fail with the command)
    eval_batches: int = 8  # held-out mixture batches per evaluation (the same ones every time)
    export_dir: str | None = None  # None: <run_dir>/world_model
    export_dtype: str = "float16"  # weights of the export: float16 | bfloat16 | float32 | int8 (training stays float32)
    input_noise: float = 0.0  # max fraction of an image's code inputs replaced by random codes (targets clean)
    changed_weight: float = 1.0  # loss-weight factor of the codes that differ from the previous image's

    def __post_init__(self) -> None:
        check_export_dtype(self.export_dtype, "world_model.export_dtype", WORLD_MODEL_EXPORT_DTYPES)
        if not 0.0 <= float(self.input_noise) < 1.0:
            raise ValueError(f"world_model.input_noise must be in [0, 1) (the largest fraction of an image's codes "
                             f"replaced in the model's input), got {self.input_noise}")
        if not 0.0 < float(self.changed_weight) < float("inf"):
            raise ValueError(f"world_model.changed_weight must be a finite factor > 0 (1: no reweighting), "
                             f"got {self.changed_weight}")
        if not str(self.tokenizer).strip():
            raise ValueError("world_model.tokenizer is empty; give the tokenizer folder (e.g. checkpoints/tokenizer)")
        if self.eval_batches < 1:
            raise ValueError(f"world_model.eval_batches must be >= 1, got {self.eval_batches}")


@dataclass
class Parts:
    stage: Any  # the stage's section: WorldModelStageConfig, or the DiDA stage's (the same export settings)
    roots: FrameDataConfig
    data: DataConfig
    layout: LayoutConfig
    model: WorldModelConfig
    loop: LoopConfig


def mixture_specs(roots: FrameDataConfig, data: DataConfig) -> list[DatasetSpec]:
    """The datasets under ``dataset.root``, with weight/tag/cameras from a matching ``data.datasets`` entry."""
    listed = {str(Path(s.root).resolve()): s for s in data.datasets}
    specs = []
    for root in resolve_roots(roots.roots):
        spec = listed.get(str(root.resolve()), DatasetSpec(str(root)))
        cameras = spec.cameras if spec.cameras is not None else roots.cameras
        specs.append(replace(spec, root=str(root), cameras=cameras))
    return specs


def read_init(cfg: DictConfig, stage: str) -> WorldModelExport:
    """The export named by ``init=`` (required by stage=dida, optional for stage=world_model)."""
    if not cfg.get("init"):
        raise UserError(f"stage={stage} starts from a trained world model: give its export folder with "
                        "init=<folder> (e.g. init=checkpoints/world_model, written by "
                        "`python -m emu_world.train stage=world_model`)")
    return WorldModelExport.read(str(cfg.init))


def init_ignored(cfg: DictConfig, init: WorldModelExport) -> list[str]:
    """The composed ``model``/``layout`` settings that differ from the export's (the export's win;
    the layout's loss weights, :data:`LOSS_LAYOUT_KEYS`, are this run's and not listed)."""
    composed = OmegaConf.to_container(cfg, resolve=True)
    adopted = OmegaConf.to_container(adopt_init(cfg, init), resolve=True)
    keys = ("model", "layout")
    return config_diffs({k: adopted[k] for k in keys}, {k: composed[k] for k in keys})


# Layout fields that only weigh or mask the loss: a run that starts from an export takes them from its own
# config (the weights do not fix them), e.g. ``layout.action_weight=0.1`` to spend a fine-tune on frames.
LOSS_LAYOUT_KEYS = ("text_weight", "vision_weight", "action_weight", "structure_weight", "train_prompt")


def adopt_init(cfg: DictConfig, init: WorldModelExport) -> DictConfig:
    """This run's config with the init export's ``model`` and ``layout`` (its weights fix them), except
    the layout's loss weights (:data:`LOSS_LAYOUT_KEYS`), which stay this run's."""
    saved = init.manifest["config"]
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.model = saved["model"]
    out.layout = {**saved["layout"], **{k: out.layout[k] for k in LOSS_LAYOUT_KEYS if k in out.layout}}
    out.init = str(init.path)
    return out


def binner_shift(saved: ActionBinner, mine: ActionBinner) -> float:
    """How far ``mine``'s range edges lie from ``saved``'s, in bins of ``saved`` (inf: another
    bin count or action size)."""
    if saved.num_bins != mine.num_bins or saved.low.shape != mine.low.shape:
        return float("inf")
    width = np.maximum((saved.high - saved.low) / saved.num_bins, 1e-12)  # (A,) one bin
    return float((np.maximum(np.abs(mine.low - saved.low), np.abs(mine.high - saved.high)) / width).max())


def check_binners(binners: dict[str, ActionBinner], init: WorldModelExport) -> None:
    """The action binners of the datasets the init export was trained on must be the ones it saved, so
    the action tokens keep their meaning (a dataset it has not seen gets its own binner)."""
    for entry in init.manifest.get("data", []):
        name, file = entry.get("name"), entry.get("binner")
        if not file or name not in binners:
            continue
        shift = binner_shift(ActionBinner.load(init.path / file), binners[name])
        if shift > BINNER_TOLERANCE:
            raise UserError(f"dataset {name}: its action binner (from the dataset statistics) differs from the one "
                             f"the init export was trained with ({init.path / file}; range edges moved by up to "
                             f"{shift:.3g} bins, more than {BINNER_TOLERANCE}): the same name now holds other "
                             "data. Train on the datasets the export was trained on (same dataset.root), give the "
                             "new data its own dataset name, or train from scratch")


def parse_config(cfg: DictConfig, section: Any = None) -> Parts:
    """The world-model stage's typed config; ``section`` replaces the ``world_model:`` section (the DiDA
    stage's: tokenizer, tokenize, eval_batches, export_dir, export_dtype)."""
    roots = to_dataclass(FrameDataConfig, cfg.dataset)
    data = to_dataclass(DataConfig, cfg.data)
    data = replace(data, datasets=mixture_specs(roots, data))  # __post_init__ checks the new list
    section = section if section is not None else to_dataclass(WorldModelStageConfig, cfg.world_model)
    parts = Parts(section, roots, data,
                  to_dataclass(LayoutConfig, cfg.layout), to_dataclass(WorldModelConfig, cfg.model),
                  to_dataclass(LoopConfig, cfg.train))
    if parts.loop.batch_size % parts.data.rows:
        raise UserError(f"train.batch_size={parts.loop.batch_size} (packed rows per step) must be a multiple of "
                         f"data.rows={parts.data.rows} (rows per mixture batch)")
    return parts


# ----------------------------------------------------------------------------- data


def prepare_token_cache(parts: Parts, tokenizer: ImageTokenizer, info: DistInfo, log=print) -> None:
    """Encode the (episode, camera) entries missing from each dataset's token cache (rank 0; the others wait)."""
    if parts.stage.tokenize and info.is_main:
        for spec in parts.data.datasets:
            r = tokenize_dataset(spec.root, tokenizer, cache_root=parts.data.token_cache, cameras=spec.cameras,
                                 threads=torch.get_num_threads())
            log(f"token cache {r.cache}: {r.encoded} entries encoded, {r.skipped} present ({r.seconds:.1f}s)")
    if info.enabled:
        dist.barrier()


def step_batches(step: int, per_step: int, info: DistInfo) -> list[int]:
    """Mixture batch indices this rank trains on at ``step`` (its share of the global step)."""
    return list(range(step * per_step + info.rank, (step + 1) * per_step, info.world_size))


# ----------------------------------------------------------------------------- loop pieces


def checkpoint_modules(model: WorldModel) -> dict[str, nn.Module]:
    """The modules a checkpoint stores: the decoder body, the output head when it is not tied to the input
    embedding (safetensors refuses two names for one tensor; loading the body restores a tied head), and the
    previous-frame hint embedding when the model has one."""
    parts: dict[str, nn.Module] = {"model": model.decoder.model}
    if not model.config.tie_embeddings:
        parts["lm_head"] = model.decoder.lm_head
    if model.hint_embed is not None:  # previous-frame hints (model.frame_hints) are trained weights too
        parts["hint_embed"] = model.hint_embed
    if model.action_mlp is not None:  # and action hints (model.action_hints)
        parts["cell_embed"] = model.cell_embed
        parts["action_mlp"] = model.action_mlp
    return parts


def place_world_model(model: WorldModel, loop: LoopConfig, info: DistInfo) -> nn.Module | None:
    """:func:`~emu_world.train.loop.place_model` for a world model: one FSDP unit per decoder layer;
    ``logits`` (evaluation, the DiDA loss) gathers the root's weights like ``forward``."""
    return place_model(model, list(model.decoder.model.layers), loop.parallel, info, ("logits",))


def unsharded(model: WorldModel, sharded: nn.Module | None, layout: SequenceLayout, info: DistInfo) -> WorldModel:
    """The model with whole weights for exporting: itself, or under FSDP a CPU copy gathered from the
    shards (a collective: every rank calls it; only rank 0's copy holds the weights)."""
    if sharded is None:
        return model
    modules = checkpoint_modules(model)
    states, _ = gather_states(sharded, modules, {})
    plain = WorldModel(model.config, layout)
    if info.is_main:
        for name, module in checkpoint_modules(plain).items():
            load_state_checked(module, states[name], f"the gathered {name} weights")
    return plain


def corrupt_image_inputs(layout: SequenceLayout, packed: Packed, max_rate: float,
                         gen: torch.Generator) -> torch.Tensor:
    """(R, L) tokens of ``packed`` whose images' codes are partly replaced: image i draws a rate
    ``r_i ~ U(0, max_rate)`` and each of its codes becomes, with probability ``r_i``, a uniformly random
    code (the DiDA uniform path at ``t = 1 - r_i``); EOLs and every other token stay."""
    tokens = torch.as_tensor(packed.tokens).clone()  # (R, L)
    spans = torch.as_tensor(packed.image_spans)  # (F, 3) row, start, end
    if max_rate <= 0 or len(spans) == 0:
        return tokens
    keep = torch.ones(tokens.shape)  # (R, L) time t of each position: 1 = clean
    for (row, a, b), rate in zip(spans.tolist(), (torch.rand(len(spans), generator=gen) * max_rate).tolist()):
        keep[row, a:b] = 1.0 - rate
    start = layout.vision.start
    noisy = (tokens >= start) & (tokens < layout.vision.stop) & (keep < 1.0)
    path = NoisePath(NoiseConfig("uniform", "linear"), layout.codebook_size)
    tokens[noisy] = path.sample(tokens[noisy] - start, keep[noisy], gen) + start
    return tokens


def changed_code_weights(layout: SequenceLayout, tokens: torch.Tensor, hints: torch.Tensor,
                         weights: torch.Tensor, factor: float) -> torch.Tensor:
    """(R, L) loss weights with those of the vision codes that differ from the previous image's code at
    the same cell (what moved) multiplied by ``factor``; ``hints`` are the tokens' previous-frame hints
    (:meth:`SequenceLayout.frame_hints`: ``hints[:, i]`` is the previous code at the cell of ``i + 1``;
    with action hints, channel :data:`~emu_world.models.layout.HINT_CODE` is)."""
    prev = (hints[..., HINT_CODE] if hints.dim() == 3 else hints)[:, :-1]  # (R, L-1): previous code at i + 1
    moved = (prev >= 0) & (tokens[:, 1:] - layout.vision.start != prev)  # (R, L-1)
    out = weights.clone()
    out[:, 1:] = torch.where(moved, weights[:, 1:] * factor, weights[:, 1:])
    return out


def ar_batch_loss(model: WorldModel, data: MixtureDataset, b: int, input_noise: float = 0.0,
                  changed_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The world-model stage's loss of mixture batch ``b``: the layout-weighted next-token CE.

    ``input_noise > 0`` (``world_model.input_noise``): the model reads the batch with its images'
    codes corrupted (:func:`corrupt_image_inputs`, seeded by ``(data.seed, b)`` so a resumed run
    sees the same noise; previous-frame hints come from the corrupted images too) and predicts the
    clean tokens. Token-by-token generation reads its own imperfect codes, earlier in the frame and
    in the frames before; a model trained only on clean inputs lets those errors spread
    (exposure bias; GameNGen's noise augmentation of context frames is the continuous analogue).
    ``changed_weight`` (``world_model.changed_weight``): the loss weight of the codes that moved
    since the previous image is multiplied by it (:func:`changed_code_weights`)."""
    packed = data.batch(b).packed
    inputs = model.packed_inputs(packed, model.device)  # packed (R, L)
    if input_noise <= 0 and changed_weight == 1.0:
        return model(**inputs)
    tokens, doc_ids, weights = inputs["tokens"], inputs["doc_ids"], inputs["weights"]
    clean_hints = None
    if changed_weight != 1.0:
        clean_hints = model.hints_for(tokens, doc_ids)  # (R, L[, C]), also the model's when reading clean
        weights = changed_code_weights(data.layout, tokens, clean_hints, weights, changed_weight)
    if input_noise > 0:
        noisy = corrupt_image_inputs(data.layout, packed, input_noise, seeded_generator(data.config.seed, b))
        logits = model.logits(noisy.to(model.device), doc_ids, inputs["position_ids"])  # hints from noisy images
    else:
        logits = model.logits(tokens, doc_ids, inputs["position_ids"], hints=clean_hints)
    return next_token_loss(logits, tokens, weights, inputs["roles"])


BatchLoss = Callable[[WorldModel, MixtureDataset, int], tuple[torch.Tensor, dict[str, float]]]


def train_step(model: WorldModel, opt: torch.optim.Optimizer, data: MixtureDataset, indices: list[int],
               loop: LoopConfig, info: DistInfo, batch_loss: BatchLoss = ar_batch_loss,
               logged: tuple[str, ...] = LOGGED) -> dict[str, float]:
    """One optimisation step over this rank's mixture batches ``indices`` (every rank holds as many).

    ``batch_loss(model, data, b)`` gives a batch's loss and logs (the DiDA stage passes its own);
    ``logged`` names the logs averaged over batches and ranks."""
    model.train()
    opt.zero_grad(set_to_none=True)
    sums = torch.zeros(2 * len(logged) + 1, dtype=torch.float64)  # [value sums | counts | tokens]
    for b in indices:
        with loop.autocast():
            loss, logs = batch_loss(model, data, b)
        (loss / len(indices)).backward()  # this rank's mean; averaged over ranks: the mean of all per_step batches
        for i, key in enumerate(logged):
            if key in logs:
                sums[i] += logs[key]
                sums[len(logged) + i] += 1
        sums[-1] += logs["tokens"]
    average_gradients(model, info, sharded=loop.parallel == "fsdp")
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip) if loop.grad_clip > 0 else None
    opt.step()
    sums = all_reduce_sum(sums, info)
    out = {key: float(sums[i] / sums[len(logged) + i]) for i, key in enumerate(logged) if sums[len(logged) + i] > 0}
    out["tokens"] = float(sums[-1])
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


@torch.no_grad()
def evaluate(model: WorldModel, heldout: MixtureDataset, num_batches: int) -> dict[str, float]:
    """Per-kind held-out loss and next-frame token accuracy over the first ``num_batches`` held-out batches."""
    model.eval()
    metrics = HeldoutMetrics()
    for b in range(num_batches):
        batch = heldout.batch(b)
        inputs = model.packed_inputs(batch.packed, model.device)
        metrics.update(model.logits(inputs["tokens"], inputs["doc_ids"], inputs["position_ids"]), batch)
    return {k: round(float(v), 5) for k, v in metrics.result().items()}


# ----------------------------------------------------------------------------- the stage


class WorldModelStage(Stage):
    """``stage=world_model``: the token cache, the mixture of datasets and sample kinds, the decoder
    (fresh, or ``init=<export>`` to fine-tune), weighted next-token CE, held-out per-kind metrics, the
    export folder. The DiDA stage is this stage with another loss, evaluation and manifest."""

    name = "world_model"

    def __init__(self, cfg: DictConfig):
        self.init, self.ignored = None, []
        if cfg.get("init"):
            self.init = read_init(cfg, self.name)
            self.ignored = init_ignored(cfg, self.init)
            cfg = adopt_init(cfg, self.init)
        self.setup(cfg, None)

    def setup(self, cfg: DictConfig, section: Any) -> None:
        """Parse ``cfg`` (with ``section`` as the stage's export settings; None: ``world_model:``)."""
        self.cfg, self.parts = cfg, parse_config(cfg, section)
        self.loop = self.parts.loop
        self.per_step = self.loop.batch_size // self.parts.data.rows  # mixture batches per optimisation step (G)
        self.resolved = resolved_config(cfg)
        self.resolved["data"]["datasets"] = [asdict(s) for s in self.parts.data.datasets]  # what dataset.root named

    def prepare(self, info: DistInfo) -> None:
        if self.ignored:
            self.log(f"init={self.init.path}: the model and layout are the export's; composed settings ignored: "
                     + "; ".join(self.ignored))
        if self.per_step % info.world_size:
            raise UserError(f"train.batch_size={self.loop.batch_size} gives {self.per_step} mixture batches of "
                            f"data.rows={self.parts.data.rows} per step, not divisible by the {info.world_size} "
                            "torchrun ranks")
        self.tokenizer = load_tokenizer(self.parts.stage.tokenizer)
        if self.init is not None:
            self.init.check_tokenizer(self.tokenizer, f"give that tokenizer's folder (or one with its codes) with "
                                                      f"{self.section_name}.tokenizer=<folder>")

    section_name = "world_model"

    def check_resume(self, meta: dict[str, Any], path: Path) -> None:
        saved_id, tokenizer_id = meta["state"].get("tokenizer_id"), self.tokenizer.identity()
        if saved_id != tokenizer_id:
            raise UserError(f"{path} was trained on codes of tokenizer {saved_id}, but {self.section_name}.tokenizer "
                            f"is {tokenizer_id}; resume with the same tokenizer or start a new run_dir")

    def build(self, resuming: bool) -> None:
        parts, info = self.parts, self.info
        prepare_token_cache(parts, self.tokenizer, info, self.log)
        tokenizer_id = self.tokenizer.identity()
        self.layout = SequenceLayout.from_config(parts.layout, self.tokenizer.codebook_size, tuple(self.tokenizer.grid))
        self.train_data = MixtureDataset(parts.data, self.layout, tokenizer_id, split="train")
        self.heldout = MixtureDataset(parts.data, self.layout, tokenizer_id, split="heldout") \
            if parts.data.heldout_fraction > 0 else None
        for (name, kind), p in self.train_data.probabilities.items():
            self.log(f"data {name}/{kind.value}: {p:.3f} of the draws")
        if self.init is not None:
            check_binners(self.train_data.binners, self.init)
        torch.manual_seed(int(self.cfg.seed))  # the same initial weights on every rank
        self.model = self.make_model()
        self.sharded = place_world_model(self.model, self.loop, info)  # device; FSDP2 shards
        self.optimizers = {"model": torch.optim.AdamW(self.model.parameters(), lr=self.loop.lr,
                                                      betas=tuple(self.loop.betas),
                                                      weight_decay=self.loop.weight_decay)}
        self.models = checkpoint_modules(self.model)
        self.log(f"world model: {self.model.num_parameters():,} parameters, vocabulary {self.layout.vocab_size}, "
                 f"{self.per_step} batches x {parts.data.rows} rows x {parts.data.max_len} tokens per step")

    def make_model(self) -> WorldModel:
        if self.init is None:
            return WorldModel(self.parts.model, self.layout)
        self.log(f"fine-tuning {self.init.path}")
        return self.init.load_model(self.layout)  # checks the layout spec

    def batch_loss(self, model: WorldModel, data: MixtureDataset, b: int) -> tuple[torch.Tensor, dict[str, float]]:
        return ar_batch_loss(model, data, b, float(self.parts.stage.input_noise),
                             float(self.parts.stage.changed_weight))

    logged = LOGGED

    def train_step(self, step: int) -> dict[str, float]:
        return train_step(self.model, self.optimizers["model"], self.train_data,
                          step_batches(step, self.per_step, self.info), self.loop, self.info, self.batch_loss,
                          self.logged)

    def evaluate(self) -> dict[str, Any] | None:
        if self.heldout is None:
            return None
        return evaluate(self.model, self.heldout, self.parts.stage.eval_batches)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"tokenizer_id": self.tokenizer.identity()}

    def manifest_extra(self, train_seconds: float) -> dict[str, Any] | None:
        """What the export's manifest adds (a fine-tune: where it started and the whole chain's time)."""
        if self.init is None:
            return None
        return {"init": self.init.record(), "train_seconds_total": self.init.total_after(train_seconds)}

    def export(self, final: dict[str, Any] | None, train_seconds: float) -> tuple[Path | None, dict[str, Any] | None]:
        plain = unsharded(self.model, self.sharded, self.layout, self.info)  # a collective under FSDP
        if not self.info.is_main:
            return None, final
        stage = self.parts.stage
        out = Path(stage.export_dir) if stage.export_dir else Path(self.cfg.run_dir) / "world_model"
        return export(plain, self.train_data, self.tokenizer, self.parts, self.resolved, final, train_seconds,
                      self.info, out, self.manifest_extra(train_seconds)), final


def export(model: WorldModel, data: MixtureDataset, tokenizer: ImageTokenizer, parts: Parts,
           resolved: dict[str, Any], metrics: dict[str, float], train_seconds: float, info: DistInfo,
           out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the world model folder: weights + config (``WorldModel.save``), ``binners/<dataset>.json``
    and ``manifest.json`` (command, config, data, tokenizer identity, code version, metrics; plus
    ``extra`` entries, e.g. the DiDA stage's)."""
    model.save(out, dtype=getattr(torch, parts.stage.export_dtype))
    binners = out / "binners"
    binners.mkdir(exist_ok=True)
    for name, binner in data.binners.items():
        binner.save(binners / f"{name}.json")
    manifest = {
        "command": command_line("emu_world.train"),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {"path": parts.stage.tokenizer, "identity": tokenizer.identity(),
                      "code_identity": tokenizer.code_identity(),
                      "codebook_size": int(tokenizer.codebook_size), "grid": list(tokenizer.grid)},
        "config": resolved,
        "data": [{"name": s.name, "root": str(s.root), "embodiment": s.embodiment, "cameras": list(s.cameras),
                  "train_episodes": len(s.split_episodes["train"]),
                  "heldout_episodes": len(s.split_episodes["heldout"]),
                  "kinds": {k.value: round(p, 4) for k, p in s.kind_probs.items()},
                  "binner": f"binners/{s.name}.json" if s.binner is not None else None} for s in data.sources],
        "mixture": {f"{name}/{kind.value}": round(p, 4) for (name, kind), p in data.probabilities.items()},
        "metrics": metrics,
        "train_seconds": round(train_seconds, 1),
        "world_size": info.world_size,
        "torch_threads_per_rank": torch.get_num_threads(),
        "parameters": model.num_parameters(),
        "note": "metrics: held-out episodes of the training datasets (the last data.heldout_fraction of each), "
                "teacher-forced: per-kind weighted CE and next-frame vision-token argmax accuracy",
        **(extra or {}),
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(out / "manifest.json")
    print(f"exported world model to {out} (held-out {metrics})", flush=True)
    return out

