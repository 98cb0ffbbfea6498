"""The planner: goal text + the current frame -> the subtask to pursue (text, token by token) and its
keyframe (the frame that shows it done), imagined by the world model.

    planner = Planner(PlannerConfig(checkpoint="checkpoints/world_model"), task="aloha_fold")
    planner.reset()
    plan = planner.plan(frame)                 # Plan: subtask index and text, keyframe codes and image
    plan = planner.plan(frame, reached=True)   # the current keyframe was reached: the next subtask

Prompt (the world model's plan samples, Emu3.5's embodied format): ``BOS PLAN "<tag>: <task>"
image(frame)``, then the model writes the subtask text (greedy, stopping where the next image would
start), then ``text image(...)`` is decoded as the keyframe by DiDA or token by token (``decoding: auto``,
the default: DiDA when the planning export is DiDA-adapted, else token by token).

Memory. A single frame is ambiguous inside a subtask (late in "grasp" the model already says
"lift"), so the planner keeps the index of the subtask it pursues (into the task's subtask list) and
treats the generated text as evidence, not as the decision: the index moves on when the policy says
the keyframe is reached (``reached=True``) or the step budget of the subtask ran out (the agent
decides both); it goes back only after ``back_votes`` consecutive plans named an earlier subtask (the
cloth slipped out of the grippers); a text that names no known subtask changes nothing. The first plan
pursues the task's first subtask (``begin: first``; ``said``: the one the model names, for an episode
that starts mid-task). The keyframe is always imagined for the pursued subtask's text. ``text: known``
skips the text generation.

Everything the planner imagined is kept (:attr:`Planner.history`) for logging and videos.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from emu_world.errors import UserError
from emu_world.models.export import WorldModelExport
from emu_world.models.generate import GenerationConfig, Generator, Sampling
from emu_world.rollouts import load_for_task, task_checkpoint

DECODINGS = ("auto", "dida", "ar")
TEXTS = ("generate", "known")
BEGINS = ("first", "said")


@dataclass
class PlannerConfig:
    """``planner:`` section (``configs/agent/world_model.yaml``)."""

    checkpoint: str = "auto"  # the world-model export that imagines keyframes (auto: rollouts.task_checkpoint)
    tokenizer: str | None = None  # its tokenizer (null: the one the export records; code identity checked)
    decoding: str = "auto"  # dida | ar: how the keyframe is decoded; auto: with checkpoint=auto the task's own
    #                         export (else the default), by DiDA if that export is DiDA-adapted, else token by token
    steps: int | None = 8  # DiDA refinement passes (null: the export's K, tuned for next frames)
    start: str = "noise"  # DiDA's first codes: noise (a keyframe differs much from the frame) | previous (warm start
    #                       from the current frame, the export's default for next frames: it keeps the arms home)
    text: str = "generate"  # generate: the model names the subtask (evidence for the index) | known: skip it
    back_votes: int = 3  # consecutive plans naming an earlier subtask before the index goes back
    begin: str = "first"  # the first plan's subtask: first (the task's first: episodes start at a reset) | said
    #                       (the one the model names: an episode may start mid-task; the default model named
    #                       widowx's last subtask from its first frame, and the agent waited there for 120 steps)
    reached_codes: float | None = None  # also advance when this fraction of the frame's codes equals the pursued
    #                                     keyframe's (the planner's own reached test; null: only the caller's)
    seed: int = 0  # DiDA's noise (greedy decoding otherwise)

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"planner.decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.text not in TEXTS:
            raise ValueError(f"planner.text must be one of {TEXTS}, got {self.text!r}")
        if self.begin not in BEGINS:
            raise ValueError(f"planner.begin must be one of {BEGINS}, got {self.begin!r}")
        if self.back_votes < 1:
            raise ValueError(f"planner.back_votes must be >= 1, got {self.back_votes}")
        if self.start not in ("noise", "previous"):
            raise ValueError(f"planner.start must be noise or previous, got {self.start!r}")
        if self.reached_codes is not None and not 0.0 < self.reached_codes <= 1.0:
            raise ValueError(f"planner.reached_codes must be in (0, 1] or null, got {self.reached_codes}")


@dataclass
class Plan:
    """What the planner imagined at one call."""

    subtask_index: int  # the subtask pursued (into the task's list)
    text: str  # its text
    said: str | None  # the text the model generated (None: text=known)
    keyframe_codes: np.ndarray  # (h, w)
    keyframe: np.ndarray  # (H, W, 3) uint8, decoded
    seconds: float  # text + keyframe, tokenizer encode and decode included
    reason: str  # first | reached | budget | replan | back
    frame: np.ndarray  # (H, W, 3) uint8: the camera frame it was planned from


@dataclass
class PlannerState:
    index: int = 0
    back: int = 0  # consecutive plans that named an earlier subtask
    history: list[Plan] = field(default_factory=list)


def nearest_subtask(text: str, subtasks: tuple[str, ...]) -> int | None:
    """The index of the subtask ``text`` names (exact, else the closest above 0.8 similarity), or None."""
    if text in subtasks:
        return subtasks.index(text)
    scores = [difflib.SequenceMatcher(None, text, s).ratio() for s in subtasks]
    best = int(np.argmax(scores))
    return best if scores[best] >= 0.8 else None


def resolve_decoding(config: PlannerConfig, task: str) -> PlannerConfig:
    """``decoding: auto`` made concrete: the export that plans (``checkpoint=auto``: the task's own if there,
    else the default model) decodes by DiDA when it was DiDA-adapted, else token by token."""
    if config.decoding != "auto":
        return config
    folder = task_checkpoint(task, "ar") if config.checkpoint == "auto" else config.checkpoint
    return replace(config, checkpoint=folder, decoding="dida" if WorldModelExport.read(folder).dida_adapted else "ar")


class Planner:
    """See the module docstring. ``task``: the env name whose instruction and subtasks are planned."""

    def __init__(self, config: PlannerConfig, task: str):
        import envs

        config = resolve_decoding(config, task)
        self.config = config
        self.tokenizer, self.ex, spec = load_for_task(config.checkpoint, config.tokenizer, task, config.decoding)
        if config.decoding == "dida" and not self.ex.export.dida_adapted:
            raise UserError(f"planner.decoding=dida needs a DiDA-adapted export; {self.ex.path} was not adapted: run "
                            f"`python -m emu_world.train stage=dida init={self.ex.path} dataset.root=datasets/{task}` "
                            "or set planner.decoding=ar")
        env_cls = envs.task_spec(task).env_cls()
        self.subtasks: tuple[str, ...] = tuple(env_cls.subtasks)
        self.prompt = self.ex.layout.task_prompt(spec.tag, env_cls.task)
        self.predict = self.ex.predictor(spec, config.decoding, self.tokenizer, config.steps, Sampling(0.0), config.start)
        self.text_generator = Generator(self.ex.model, self.ex.layout, GenerationConfig(text=Sampling(0.0)))
        self.state = PlannerState()

    def reset(self) -> None:
        self.state = PlannerState()

    @property
    def history(self) -> list[Plan]:
        return self.state.history

    def say(self, codes: np.ndarray) -> str:
        """The subtask text the model writes after the current frame (greedy, text only)."""
        prompt = self.ex.layout.plan(self.prompt, codes, [], [], end=False).tokens
        out = self.text_generator.generate(prompt, max_new_tokens=self.ex.layout.config.max_text_tokens + 1,
                                           stop_at_image=True)
        return out.parsed.texts[-1] if out.parsed is not None and out.parsed.texts else ""

    def _choose(self, said: str | None, reached: bool, budget: bool) -> tuple[int, str]:
        """The subtask index after this plan's evidence, and why it is what it is."""
        st, last = self.state, len(self.subtasks) - 1
        if not st.history:
            named = nearest_subtask(said, self.subtasks) if said and self.config.begin == "said" else None
            return (named if named is not None else 0), "first"
        if (reached or budget) and st.index < last:
            st.back = 0
            return st.index + 1, "reached" if reached else "budget"
        named = nearest_subtask(said, self.subtasks) if said else None
        st.back = st.back + 1 if named is not None and named < st.index else 0
        if st.back >= self.config.back_votes:
            st.back = 0
            return int(named), "back"
        return st.index, "replan"

    def imagine(self, codes: np.ndarray, text: str, seed: int = 0) -> np.ndarray:
        """(h, w) codes of the keyframe of subtask ``text`` seen from the frame with ``codes``."""
        prompt = self.ex.layout.plan(self.prompt, codes, [text], [], end=False).tokens
        return self.predict(prompt, seed=seed).codes

    def codes_reached(self, codes: np.ndarray) -> bool:
        """The planner's own reached test: enough of the frame's codes equal the pursued keyframe's."""
        if self.config.reached_codes is None or not self.state.history:
            return False
        return float((codes == self.state.history[-1].keyframe_codes).mean()) >= self.config.reached_codes

    def plan(self, frame: np.ndarray, reached: bool = False, budget: bool = False, seed: int | None = None) -> Plan:
        """Plan from ``frame`` ((H, W, 3) uint8): ``reached`` / ``budget``: the current keyframe was reached
        / its step budget ran out (the index moves on)."""
        t0 = time.perf_counter()
        codes = self.tokenizer.encode(np.asarray(frame)[None]).numpy()[0]  # (h, w)
        said = self.say(codes) if self.config.text == "generate" else None
        index, reason = self._choose(said, reached or self.codes_reached(codes), budget)
        self.state.index = index
        text = self.subtasks[index]
        seed = self.config.seed + len(self.state.history) if seed is None else seed
        keyframe_codes = self.imagine(codes, text, seed)
        keyframe = self.tokenizer.decode(keyframe_codes[None]).numpy()[0]
        plan = Plan(index, text, said, keyframe_codes, keyframe, time.perf_counter() - t0, reason, np.array(frame))
        self.state.history.append(plan)
        return plan

    def summary(self) -> list[dict[str, Any]]:
        """The plans of the episode so far, without images (for the JSON records)."""
        return [{"subtask": p.subtask_index, "text": p.text, "said": p.said, "reason": p.reason,
                 "seconds": round(p.seconds, 4)} for p in self.state.history]

    def describe(self) -> dict[str, Any]:
        """Which world model and decoding planned (for the records)."""
        return {"checkpoint": str(self.ex.path), "decoding": self.config.decoding, "steps": self.config.steps,
                "text": self.config.text}
