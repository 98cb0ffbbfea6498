"""The one reader of a world-model export: the folder ``train stage=world_model`` or ``stage=dida``
writes (``model.safetensors`` + ``config.json``, ``binners/<dataset>.json``, ``manifest.json``).

    export = WorldModelExport.read("checkpoints/world_model")     # manifest only; clear error if absent
    export.check_tokenizer(tokenizer)                              # the codes it was trained on
    layout = export.layout(tokenizer)                              # vocabulary and sequence layout
    model = export.load_model(layout)                              # weights (int8 dequantised)
    binner = export.binner("aloha_fold")                           # a dataset's action bins
    decoding = export.decoding("dida", Sampling(0.0))              # AR or DiDA with its recorded sampler
    predict = export.frame_predictor(model, layout, decoding, tokenizer, action_dim=14)

Training reads it to fine-tune or DiDA-adapt (``init=<folder>``: its manifest's ``record`` and
training time), the benchmarks, the world-model environment (:mod:`emu_world.rollouts`), the
planner and the exploration demo read it to imagine frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from emu_world.config import resolve_path, to_dataclass
from emu_world.errors import MissingInputError
from emu_world.models.dida import (
    FrameDecodingConfig,
    NoiseConfig,
    NoisePath,
    SamplerConfig,
    frame_predictor,
    tokenizer_codebook,
)
from emu_world.models.generate import Sampling
from emu_world.models.layout import ActionBinner, LayoutConfig, SequenceLayout
from emu_world.models.tokenizer import ImageTokenizer, check_same_codes
from emu_world.models.world_model import WorldModel

MANIFEST = "manifest.json"
TRAIN_COMMAND = ("python -m emu_world.train stage=world_model dataset.root=datasets "
                 "world_model.export_dir=checkpoints/world_model")


@dataclass
class WorldModelExport:
    """A world-model export folder and its manifest (command, config, data, tokenizer, metrics)."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path, what: str = "world model") -> "WorldModelExport":
        """The export at ``path`` (as given, or relative to the repository root); a folder without a
        manifest is refused with the command that trains one."""
        folder = resolve_path(path)
        file = folder / MANIFEST
        if not file.is_file():
            raise MissingInputError(
                f"{path}: {folder} holds no {what} export ({MANIFEST} is missing). Train one with "
                f"`{TRAIN_COMMAND}`, or give the folder an export was written to"
            )
        return cls(folder, json.loads(file.read_text()))

    # ------------------------------------------------------------------------- what it was trained on

    @property
    def config(self) -> dict[str, Any]:
        """The training run's composed config."""
        return self.manifest["config"]

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer folder it was trained with (as recorded; relative paths from the repository root)."""
        return resolve_path(self.manifest["tokenizer"]["path"])

    @property
    def dida_adapted(self) -> bool:
        return bool(self.manifest.get("dida"))

    def check_tokenizer(self, tokenizer: ImageTokenizer,
                        fix: str = "pass the tokenizer it was trained with (tokenizer=<folder>)") -> None:
        """Refuse a tokenizer that maps frames to other codes than the ones the model read."""
        check_same_codes(self.manifest["tokenizer"], tokenizer, f"the world model {self.path}", fix)

    def data_entries(self) -> list[dict[str, Any]]:
        """One entry per training dataset: name, root, embodiment, cameras, binner file, ..."""
        return list(self.manifest.get("data", []))

    def binner(self, dataset: str) -> ActionBinner | None:
        """The action binner of a training dataset (None: a command dataset, or not trained on it)."""
        for entry in self.data_entries():
            if entry.get("name") == dataset and entry.get("binner"):
                return ActionBinner.load(self.path / entry["binner"])
        return None

    # ------------------------------------------------------------------------- loading

    def layout(self, tokenizer: ImageTokenizer) -> SequenceLayout:
        """The sequence layout the model was trained with, over ``tokenizer``'s codebook and grid."""
        layout_cfg = to_dataclass(LayoutConfig, OmegaConf.create(self.config["layout"]))
        return SequenceLayout.from_config(layout_cfg, tokenizer.codebook_size, tuple(tokenizer.grid))

    def load_model(self, layout: SequenceLayout, device: str = "cpu") -> WorldModel:
        """The weights (an int8 export is dequantised to float32); the layout spec is checked."""
        return WorldModel.load(self.path, layout, device)

    # ------------------------------------------------------------------------- decoding frames

    def noise_path(self, layout: SequenceLayout, tokenizer: ImageTokenizer | None = None) -> NoisePath:
        """The noise path it was DiDA-adapted with; never adapted: the uniform/linear default."""
        entry = (self.manifest.get("dida") or {}).get("noise")
        config = NoiseConfig(**entry) if entry else NoiseConfig()
        codebook = tokenizer_codebook(tokenizer) if config.path == "metric" else None
        return NoisePath(config, layout.codebook_size, codebook)

    def sampler_config(self) -> SamplerConfig:
        """The DiDA sampler defaults it records (an entry without ``start`` predates it: ``start=noise``)."""
        entry = (self.manifest.get("dida") or {}).get("sampler")
        if not entry:
            return SamplerConfig()
        # exports recorded before sampler.start existed were adapted and measured starting from noise
        return SamplerConfig(**{"start": "noise", **entry})

    def decoding(self, decoding: str = "ar", vision: Sampling | None = None, cfg_scale: float | None = None,
                 **sampler: Any) -> FrameDecodingConfig:
        """AR or DiDA frame decoding; DiDA's ``steps`` / ``update`` / ``start`` / ``start_time`` default
        to the export's recorded sampler (a None override keeps the default)."""
        defaults = self.sampler_config()
        chosen = {k: (v if v is not None else getattr(defaults, k)) for k, v in sampler.items()}
        merged = SamplerConfig(**{**{k: getattr(defaults, k) for k in ("steps", "update", "start", "start_time")},
                                  **chosen})
        return FrameDecodingConfig(str(decoding), vision or Sampling(0.0), cfg_scale, merged)

    def frame_predictor(self, model: WorldModel, layout: SequenceLayout, decoding: FrameDecodingConfig,
                        tokenizer: ImageTokenizer | None = None, action_dim: int | None = None):
        """The next-frame decoder ``decoding`` names, with this export's noise path for DiDA."""
        noise = self.noise_path(layout, tokenizer) if decoding.decoding == "dida" else None
        return frame_predictor(model, layout, decoding, action_dim, noise)

    # ------------------------------------------------------------------------- provenance

    def total_seconds(self) -> float | None:
        """Training seconds of the export and every run it started from (``train_seconds_total``; an
        older manifest without it: its run plus what its ``init`` record says)."""
        m = self.manifest
        if m.get("train_seconds_total") is not None:
            return float(m["train_seconds_total"])
        if m.get("train_seconds") is None:
            return None
        init = m.get("init") or {}
        before = init.get("train_seconds_total", init.get("train_seconds"))
        return float(m["train_seconds"]) + float(before or 0.0)

    def total_after(self, seconds: float) -> float | None:
        """``train_seconds_total`` of a run of ``seconds`` that started from this export (None: the
        export's own training time is unknown)."""
        before = self.total_seconds()
        return round(seconds + before, 1) if before is not None else None

    def record(self) -> dict[str, Any]:
        """What an export that started from this one says about it (its manifest's ``init``)."""
        m = self.manifest
        return {"path": str(self.path), "command": m.get("command"), "code_version": m.get("code_version"),
                "metrics": m.get("metrics"), "train_seconds": m.get("train_seconds"),
                "train_seconds_total": self.total_seconds(), "stage": m.get("stage", "world_model")}
