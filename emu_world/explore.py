"""World exploration you can play: walk through the room the world model imagines, one key per frame.

    python -m emu_world.explore env=explore_room                          # a window (pygame), keys below
    python -m emu_world.explore env=explore_room show_truth=true          # the simulator's view beside it
    python -m emu_world.explore env=explore_room headless=true keys=wwwwjjdd     # an mp4 + per-step PSNR
    python -m emu_world.explore env=explore_room headless=true 'keys="ww<left><left>dd"'   # named keys
    python -m emu_world.explore env=explore_room headless=true keys_file=walk.txt decoding=ar
    python -m emu_world.explore env=explore_room keys=wwwwl screenshot=docs/explore_window.png

What it does. The room's simulator (``envs/explore_room.py``) is reset with ``seed`` and its first
``ego`` frame starts the world model's context (:class:`emu_world.rollouts.WorldModelEnv`: a bounded
window of ``context_frames`` frames, the oldest dropped, the prompt rebuilt as a valid exploration
stream at every step). Every key that names a command (the env's ``commands``: forward, turn left,
...) imagines the next frame from that command text, decoded by DiDA at the export's K
(``decoding=dida``, ``steps=`` to change K) or token by token (``decoding=ar``); step ``i`` is seeded
with ``seed + i``, so a run repeats exactly. ``R`` starts over in a new room (the next seed), ``Q`` or
Escape quits. ``show_truth=true`` steps the simulator with the same commands and shows its frame
beside the imagined one (with the PSNR between them); the frame size and tokens per frame come from
the export's tokenizer.

One loop, two front ends (:func:`run_loop`): a key source (:class:`PygameKeys`: the window's key
events, a held key repeats; :class:`ScriptedKeys`: ``keys=`` / ``keys_file=``, one key per frame)
feeds key names to the session, and a view shows the result (:class:`WindowView`: the window, with
the key map and the frames per second on screen; :class:`VideoView`: the frames of an mp4). Headless
(``headless=true``) is the scripted source with the video view, and always steps the simulator: it
writes ``explore.mp4`` (imagined | simulator) and ``summary.json`` to the run's output directory and
ends with one JSON line: per-step PSNR against the simulator and of copying the first frame,
``psnr_<h>`` after 1, 8 and 32 commands, frames per second (model + tokenizer decode; the start
frame's encode included). In a key string a character is a key (``w``, ``.``), ``<name>`` a named key
(``<left>``, ``<up>``, ``<space>``; Hydra needs such a value quoted, ``'keys="w<left>"'``, or use the
letter aliases ``j``/``l`` turn, ``i``/``k`` look), white space separates; unknown keys are skipped
with a warning.

Checkpoint: ``checkpoint=auto`` takes ``checkpoints/world_model_explore_room`` when it exists (and is
DiDA-adapted, for DiDA), else the default ``checkpoints/world_model``, which learnt exploration only in
part (``python -m emu_world.bench explore`` measures it against the simulator).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from emu_world.config import CONFIG_DIR, EnvConfig, resolve_path, to_dataclass
from emu_world.errors import MissingInputError, UserError, reports_user_errors
from emu_world.image_metrics import psnr_per_frame
from emu_world.media import write_mp4
from emu_world.rollouts import WorldModelEnv, load_for_task

RESET, QUIT = "reset", "quit"  # the key map's two actions that are not commands
HORIZONS = (1, 8, 32)  # psnr_<h> of the headless summary: h commands after a (re)start
DEFAULT_KEYMAP = {
    "w": "forward", "s": "back", "a": "strafe left", "d": "strafe right",
    "left": "turn left", "right": "turn right", "up": "look up", "down": "look down",
    "space": "stay", ".": "stay", "j": "turn left", "l": "turn right", "i": "look up", "k": "look down",
    "r": RESET, "q": QUIT, "escape": QUIT,
}
HEADLESS_HINT = ("python -m emu_world.explore env=explore_room headless=true keys=wwwwaadd "
                 "(an mp4 and per-step PSNR against the simulator)")


@dataclass
class ExploreConfig:
    """``configs/explore.yaml`` without its ``env`` group: the world model, decoding and the front end."""

    checkpoint: str = "auto"  # auto: checkpoints/world_model_<env> if there, else checkpoints/world_model
    tokenizer: str | None = None  # None: the tokenizer the export records
    decoding: str = "dida"  # dida (K parallel passes) | ar (token by token)
    steps: int | None = None  # DiDA's K; None: the export's recorded sampler
    context_frames: int = 1  # frames in the prompt window (the oldest dropped)
    seed: int = 0  # the room (reset i uses seed + i) and the sampling (step i uses seed + i)
    show_truth: bool = False  # window: the simulator stepped with the same commands, beside
    headless: bool = False  # no window: scripted keys, an mp4 and per-step PSNR
    keys: str | None = None  # scripted keys (headless, or played into the window first)
    keys_file: str | None = None  # the same, from a text file
    scale: int = 4  # window pixels per frame pixel
    threads: int = 1  # torch threads
    max_fps: float = 30.0  # window redraw cap while idle
    screenshot: str | None = None  # window: save the screen as a PNG here on quit
    keymap: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KEYMAP))

    def __post_init__(self) -> None:
        if self.decoding not in ("dida", "ar"):
            raise ValueError(f"decoding must be dida or ar, got {self.decoding!r}")
        if self.steps is not None and not 1 <= int(self.steps) <= 64:
            raise ValueError(f"steps (DiDA's K) must be in 1..64 or null (the export's K), got {self.steps}")
        if int(self.context_frames) < 1 or int(self.scale) < 1 or int(self.threads) < 1:
            raise ValueError("context_frames, scale and threads must be >= 1")
        if not float(self.max_fps) > 0:
            raise ValueError(f"max_fps must be > 0, got {self.max_fps}")
        if self.keys is not None and self.keys_file is not None:
            raise ValueError("give keys= or keys_file=, not both")
        if self.headless and self.keys is None and self.keys_file is None:
            raise ValueError(f"headless=true plays scripted keys: add keys=... or keys_file=<file>, e.g. "
                             f"`{HEADLESS_HINT}`")
        if self.headless and self.screenshot:
            raise ValueError("screenshot= saves the window: drop headless=true (or use the mp4 it writes)")
        self.keymap = {str(k).lower(): str(v) for k, v in dict(self.keymap).items()}


def check_keymap(keymap: dict[str, str], commands: tuple[str, ...]) -> None:
    """Every key must name one of the env's commands, reset or quit; and every command needs a key."""
    allowed = (*commands, RESET, QUIT)
    wrong = {k: v for k, v in keymap.items() if v not in allowed}
    if wrong:
        raise UserError(f"keymap: {wrong} name no action; each key maps to one of {list(allowed)}")
    missing = [c for c in allowed if c not in keymap.values()]
    if missing:
        raise UserError(f"keymap: no key for {missing}; add e.g. keymap.x='{missing[0]}'")


def parse_keys(text: str) -> list[str]:
    """Key names of a scripted key string: a character is a key, ``<name>`` a named key (``<left>``,
    ``<space>``), white space separates."""
    names, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "<":
            end = text.find(">", i)
            if end < 0:
                raise UserError(f"keys: '<' at position {i} is not closed; write named keys as <left>, <up>")
            names.append(text[i + 1:end].strip().lower())
            i = end + 1
            continue
        if not c.isspace():
            names.append(c.lower())
        i += 1
    return names


def scripted_keys(cfg: ExploreConfig) -> list[str] | None:
    """The key names of ``keys=`` or ``keys_file=`` (None: neither given)."""
    if cfg.keys_file is not None:
        path = resolve_path(cfg.keys_file)
        if not path.is_file():
            raise MissingInputError(f"keys_file={cfg.keys_file}: no such file; write the keys into it "
                                    "(e.g. `wwww<left><left>dd`) or pass keys=...")
        return parse_keys(path.read_text())
    return parse_keys(str(cfg.keys)) if cfg.keys is not None else None


# ----------------------------------------------------------------------------- the session


@dataclass
class StepRecord:
    """One command: what it imagined against the simulator (when stepped)."""

    command: str
    since_reset: int  # 1 for the first command after a (re)start
    seconds: float  # wall time of the step: model + tokenizer decode
    model_seconds: float  # the frame predictor's share
    psnr: float | None = None  # imagined vs the simulator's frame
    copy_first_psnr: float | None = None  # the (re)start frame vs the simulator's frame
    collided: bool | None = None  # the simulator refused the move


class ExploreSession:
    """The world model and (optionally) the simulator, stepped together by key names."""

    def __init__(self, world: WorldModelEnv, sim: Any, camera: str, keymap: dict[str, str], seed: int,
                 step_truth: bool):
        self.world, self.sim, self.camera, self.keymap = world, sim, camera, keymap
        self.commands = tuple(world.spec.commands or ())
        self.seed, self.step_truth = int(seed), bool(step_truth)
        self.resets, self.total_steps, self.since_reset = 0, 0, 0
        self.records: list[StepRecord] = []
        self.skipped: list[str] = []
        self.message = ""
        self.encode_seconds = 0.0
        self.first = self.imagined = self.truth = np.zeros((1, 1, 3), np.uint8)

    def reset(self) -> None:
        """Start over from the simulator's first frame of room ``seed + resets`` (encoded into the window)."""
        obs, _ = self.sim.reset(seed=self.seed + self.resets)
        self.resets += 1
        self.first = self.truth = np.asarray(obs["pixels"][self.camera])
        t0 = time.perf_counter()
        self.world.reset(frames=self.first[None])
        self.encode_seconds += time.perf_counter() - t0
        self.imagined = self.world.tokenizer.decode(self.world.codes[-1][None]).numpy()[0]
        self.since_reset = 0
        self.message = f"room {self.seed + self.resets - 1}"

    def step(self, command: str) -> StepRecord:
        """Imagine the frame after ``command`` (and step the simulator with it when stepping the truth)."""
        t0 = time.perf_counter()
        out = self.world.step(command, seed=self.seed + self.total_steps)
        self.imagined = out.frame
        self.total_steps += 1
        self.since_reset += 1
        rec = StepRecord(command, self.since_reset, time.perf_counter() - t0, out.seconds)
        if self.step_truth:
            obs, _, _, _, info = self.sim.step(self.commands.index(command))
            self.truth = np.asarray(obs["pixels"][self.camera])
            rec.psnr = float(psnr_per_frame(self.imagined[None], self.truth[None])[0])
            rec.copy_first_psnr = float(psnr_per_frame(self.first[None], self.truth[None])[0])
            rec.collided = bool(info.get("collided", False))
        self.records.append(rec)
        self.message = command
        return rec

    def handle(self, name: str) -> str:
        """Act on one key name: ``"step"``, ``"reset"``, ``"quit"`` or ``"skipped"`` (not in the key map:
        warned and remembered)."""
        action = self.keymap.get(name)
        if action is None:
            self.skipped.append(name)
            self.message = f"key {name!r} does nothing"
            warnings.warn(f"key {name!r} is not in the key map; skipped (keys: {sorted(self.keymap)})",
                          stacklevel=2)
            return "skipped"
        if action == QUIT:
            return "quit"
        if action == RESET:
            self.reset()
            return "reset"
        self.step(action)
        return "step"

    def fps(self, last: int = 10) -> float | None:
        """Imagined frames per second over the last ``last`` commands (model + tokenizer decode)."""
        recent = self.records[-last:]
        total = sum(r.seconds for r in recent)
        return len(recent) / total if recent and total > 0 else None


# ----------------------------------------------------------------------------- key sources, views, loop


class KeySource(Protocol):
    """Key names pressed since the last poll; None when the source is finished."""

    def poll(self) -> list[str] | None: ...


class ScriptedKeys:
    """A scripted key sequence, one key per poll."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.at = 0

    def poll(self) -> list[str] | None:
        if self.at >= len(self.names):
            return None
        self.at += 1
        return [self.names[self.at - 1]]


class PygameKeys:
    """The window's key presses (pygame key names); a key held for ``hold`` seconds repeats at every poll
    (walking on), and closing the window finishes the source."""

    def __init__(self, pygame: Any, repeat_keys: list[str], hold: float = 0.3):
        self.pygame, self.hold = pygame, float(hold)
        self.codes = {}
        for name in repeat_keys:
            try:
                self.codes[name] = pygame.key.key_code(name)
            except ValueError:  # a name pygame does not know (e.g. '.'): it still works as a press
                pass
        self.down_at: dict[str, float] = {}

    def poll(self) -> list[str] | None:
        pg, now, names = self.pygame, time.monotonic(), []
        for event in pg.event.get():
            if event.type == pg.QUIT:
                return None
            if event.type == pg.KEYDOWN:
                name = pg.key.name(event.key)
                names.append(name)
                self.down_at[name] = now
            elif event.type == pg.KEYUP:
                self.down_at.pop(pg.key.name(event.key), None)
        if not names:
            pressed = pg.key.get_pressed()
            names = [n for n, t in self.down_at.items()
                     if now - t >= self.hold and n in self.codes and pressed[self.codes[n]]]
        return names


class ChainedKeys:
    """Sources one after the other (scripted keys played into the window, then the keyboard)."""

    def __init__(self, *sources: KeySource):
        self.sources = list(sources)

    def poll(self) -> list[str] | None:
        while self.sources:
            names = self.sources[0].poll()
            if names is not None:
                return names
            self.sources.pop(0)
        return None


class View(Protocol):
    def show(self, session: ExploreSession) -> None: ...

    def wait(self) -> None: ...


def run_loop(session: ExploreSession, source: KeySource, view: View) -> None:
    """The one loop of both front ends: poll keys, act on each, show what changed; until the source is
    finished or a quit key."""
    view.show(session)
    while (names := source.poll()) is not None:
        for name in names:
            outcome = session.handle(name)
            if outcome == "quit":
                return
            view.show(session)
        view.wait()


# ----------------------------------------------------------------------------- headless: an mp4


def video_frame(session: ExploreSession, scale: int = 2) -> np.ndarray:
    """The imagined frame beside the simulator's, ``scale`` times the camera size, with a caption."""
    from PIL import Image, ImageDraw

    panels = [session.imagined, session.truth]
    h, w = panels[0].shape[:2]
    gap, bar = 4, 30
    canvas = Image.new("RGB", (2 * w * scale + gap, h * scale + bar), "black")
    for i, frame in enumerate(panels):
        big = np.asarray(frame, dtype=np.uint8).repeat(scale, 0).repeat(scale, 1)
        canvas.paste(Image.fromarray(big), (i * (w * scale + gap), 0))
    rec = session.records[-1] if session.records and session.since_reset else None
    text = f"{session.since_reset:>3} {session.message}"
    if rec is not None and rec.psnr is not None:
        text += f"   PSNR {rec.psnr:.1f} dB (copy first {rec.copy_first_psnr:.1f})"
    draw = ImageDraw.Draw(canvas)
    draw.text((4, h * scale + 2), "imagined | simulator", fill=(160, 160, 160))
    draw.text((4, h * scale + 15), text, fill="white")
    return np.asarray(canvas)


class VideoView:
    """Headless: one video frame per change of the session (each (re)start and each command)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.seen = -1

    def show(self, session: ExploreSession) -> None:
        changes = session.resets + session.total_steps
        if changes != self.seen:
            self.seen = changes
            self.frames.append(video_frame(session))

    def wait(self) -> None:
        pass


# ----------------------------------------------------------------------------- the window


class NoDisplayError(UserError):
    """There is no screen to open the window on."""


def no_display_reason() -> str | None:
    """Why no window can open here (None: try). SDL's dummy/offscreen drivers need no screen."""
    if os.environ.get("SDL_VIDEODRIVER", "") in ("dummy", "offscreen"):
        return None
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "DISPLAY is not set"
    return None


def no_display(reason: str) -> NoDisplayError:
    return NoDisplayError(f"no display for the exploration window ({reason}): play headless instead with "
                          f"`{HEADLESS_HINT}`, or start a virtual display (`Xvfb :99 &`, then DISPLAY=:99)")


def import_pygame() -> Any:
    """pygame, quietly (no greeting, no setuptools warning), or the install command."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    if os.environ.get("MUJOCO_GL", "egl") == "egl":
        # MuJoCo renders offscreen through EGL; SDL's X11 driver would use GLX in the same process, and the
        # simulator's next render then dies with an X error (BadAccess in X_GLXMakeCurrent; seen under Xvfb)
        os.environ.setdefault("SDL_VIDEO_X11_FORCE_EGL", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pygame
    except ImportError:
        raise MissingInputError(f"the exploration window needs pygame: pip install 'pygame>=2.5' "
                                f"(or play headless: `{HEADLESS_HINT}`)") from None
    return pygame


def open_window(pygame: Any, size: tuple[int, int], title: str) -> Any:
    """The window's screen surface, or :class:`NoDisplayError` naming the headless mode."""
    reason = no_display_reason()
    if reason is None:
        try:
            pygame.display.init()
            screen = pygame.display.set_mode(size)
            pygame.display.set_caption(title)
            return screen
        except pygame.error as e:
            reason = f"pygame could not open a window: {e}"
    raise no_display(reason)


def key_lines(keymap: dict[str, str], commands: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(keys, action)`` rows of the key map, in the env's command order, then reset and quit."""
    rows = []
    for action in (*commands, RESET, QUIT):
        keys = [k.upper() if len(k) == 1 else k.capitalize() for k, v in keymap.items() if v == action]
        if keys:
            rows.append((" / ".join(keys), "new room (reset)" if action == RESET else action))
    return rows


class WindowView:
    """The pygame window: the imagined frame (``scale`` x), the simulator's beside it with
    ``show_truth``, and a side panel with the key map, frames per second and status."""

    MARGIN, LABEL, SIDE = 14, 30, 330

    def __init__(self, pygame: Any, session: ExploreSession, cfg: ExploreConfig, about: list[str]):
        self.pg, self.cfg, self.about = pygame, cfg, about
        h, w = session.first.shape[:2]
        self.size = (w * cfg.scale, h * cfg.scale)
        panels = 2 if cfg.show_truth else 1
        self.side_x = self.MARGIN + panels * (self.size[0] + self.MARGIN)
        self.keys = key_lines(cfg.keymap, session.commands)
        lines = len(self.keys) + len(about) + 9
        height = max(self.LABEL + self.size[1] + 2 * self.MARGIN + 24, 40 + 22 * lines)
        self.screen = open_window(pygame, (self.side_x + self.SIDE, height), "emu-world: explore")
        pygame.font.init()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.font, self.big = pygame.font.Font(None, 24), pygame.font.Font(None, 30)
        self.clock = pygame.time.Clock()

    def text(self, s: str, xy: tuple[int, int], colour=(230, 230, 230), big: bool = False) -> None:
        self.screen.blit((self.big if big else self.font).render(s, True, colour), xy)

    def panel(self, frame: np.ndarray, x: int, label: str) -> None:
        surface = self.pg.surfarray.make_surface(np.ascontiguousarray(np.asarray(frame).swapaxes(0, 1)))
        self.screen.blit(self.pg.transform.scale(surface, self.size), (x, self.MARGIN + self.LABEL))
        self.text(label, (x, self.MARGIN + 4), big=True)

    def show(self, session: ExploreSession) -> None:
        self.screen.fill((24, 24, 28))
        self.panel(session.imagined, self.MARGIN, "imagined (world model)")
        if self.cfg.show_truth:
            self.panel(session.truth, self.MARGIN + self.size[0] + self.MARGIN, "simulator (truth)")
        self.sidebar(session)
        self.text(session.message, (self.MARGIN, self.MARGIN + self.LABEL + self.size[1] + 6), (255, 210, 120))
        self.pg.display.flip()
        self.pg.event.pump()

    def sidebar(self, session: ExploreSession) -> None:
        x, y = self.side_x, self.MARGIN + 4
        self.text("keys", (x, y), (140, 200, 255), big=True)
        for keys, action in self.keys:
            y += 22
            self.text(keys, (x, y), (255, 255, 255))
            self.text(action, (x + 150, y), (200, 200, 200))
        fps = session.fps()
        rec = session.records[-1] if session.records and session.since_reset else None
        status = [f"{fps:.1f} imagined frames/s" if fps else "-- imagined frames/s",
                  f"step {session.since_reset}   room {session.seed + session.resets - 1}"]
        if rec is not None and rec.psnr is not None:
            status.append(f"PSNR vs simulator {rec.psnr:.1f} dB")
        y += 34
        self.text(status[0], (x, y), (120, 255, 140), big=True)
        for line in status[1:] + [""] + self.about:
            y += 22
            self.text(line, (x, y), (200, 200, 200))

    def wait(self) -> None:
        self.clock.tick(self.cfg.max_fps)

    def close(self) -> None:
        if self.cfg.screenshot:
            path = resolve_path(self.cfg.screenshot) if not Path(self.cfg.screenshot).is_absolute() \
                else Path(self.cfg.screenshot)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.pg.image.save(self.screen, str(path))
            print(f"screenshot: {path}", file=sys.stderr, flush=True)
        self.pg.display.quit()


# ----------------------------------------------------------------------------- the command


def open_session(cfg: ExploreConfig, env_cfg: EnvConfig) -> tuple[ExploreSession, dict[str, Any]]:
    """The world model (``checkpoint``, its tokenizer, AR or DiDA) and the simulator, reset to ``seed``;
    and what the run is (checkpoint, decoding, frame size, tokens per frame)."""
    torch.set_num_threads(int(cfg.threads))
    tok, ex, spec = load_for_task(cfg.checkpoint, cfg.tokenizer, env_cfg.name, cfg.decoding)
    if spec.commands is None:
        raise UserError(f"env={env_cfg.name} is driven by actions, not commands; explore needs an exploration "
                        "env (env=explore_room)")
    check_keymap(cfg.keymap, spec.commands)
    if cfg.decoding == "dida" and not ex.export.dida_adapted:
        print(f"warning: {ex.path} was never DiDA-adapted; decoding=dida will draw poor frames "
              "(decoding=ar, or adapt it: python -m emu_world.train stage=dida init=<export>)", file=sys.stderr)
    predict = ex.predictor(spec, cfg.decoding, tok, steps=cfg.steps)
    env_cfg.image_size, env_cfg.cameras = int(tok.image_size), [spec.camera]
    env_cfg.max_episode_steps = 10**9  # open-ended: the room never times out under the player
    sim = env_cfg.make()
    world = WorldModelEnv(ex.layout, spec, predict, str(sim.unwrapped.task), cfg.context_frames, tok)
    session = ExploreSession(world, sim, spec.camera, cfg.keymap, cfg.seed, cfg.headless or cfg.show_truth)
    session.reset()
    h, w = ex.layout.grid
    info = {"env": env_cfg.name, "checkpoint": str(ex.path), "decoding": getattr(predict, "name", cfg.decoding),
            "context_frames": int(cfg.context_frames), "frame_size": int(tok.image_size),
            "tokens_per_frame": int(h * w), "seed": int(cfg.seed)}
    return session, info


def summarize(session: ExploreSession, info: dict[str, Any]) -> dict[str, Any]:
    """The headless JSON: speed, PSNR after 1, 8, 32 commands (mean over (re)starts), every step's PSNR."""
    recs = session.records

    def at(h: int, key: str) -> float | None:
        vals = [getattr(r, key) for r in recs if r.since_reset == h and getattr(r, key) is not None]
        return round(float(np.mean(vals)), 3) if vals else None

    total = session.encode_seconds + sum(r.seconds for r in recs)
    psnr = [round(r.psnr, 2) for r in recs if r.psnr is not None]
    copy = [round(r.copy_first_psnr, 2) for r in recs if r.copy_first_psnr is not None]
    return {**info, "n_commands": len(recs), "resets": session.resets - 1, "skipped_keys": session.skipped,
            "fps": round(len(recs) / total, 3) if recs else None,
            "sec_per_frame": round(float(np.mean([r.seconds for r in recs])), 4) if recs else None,
            "model_sec_per_frame": round(float(np.mean([r.model_seconds for r in recs])), 4) if recs else None,
            **{f"psnr_{h}": at(h, "psnr") for h in HORIZONS},
            **{f"copy_first_psnr_{h}": at(h, "copy_first_psnr") for h in HORIZONS},
            "mean_psnr": round(float(np.mean(psnr)), 3) if psnr else None,
            "mean_copy_first_psnr": round(float(np.mean(copy)), 3) if copy else None,
            "collided_steps": sum(bool(r.collided) for r in recs),
            "commands": [r.command for r in recs], "psnr": psnr, "copy_first_psnr": copy}


def play_headless(session: ExploreSession, keys: list[str], output_dir: Path, fps: float,
                  info: dict[str, Any]) -> dict[str, Any]:
    """Scripted keys through the loop into an mp4 (imagined | simulator); the summary, also as summary.json."""
    view = VideoView()
    run_loop(session, ScriptedKeys(keys), view)
    video = write_mp4(output_dir / "explore.mp4", view.frames, fps)
    summary = {**summarize(session, info), "video": str(video), "video_frames": len(view.frames),
               "output_dir": str(output_dir)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def play_window(session: ExploreSession, cfg: ExploreConfig, keys: list[str] | None, info: dict[str, Any]) -> None:
    """The window: scripted keys first (if any), then the keyboard, until Q, Escape or the window closes."""
    pygame = import_pygame()
    name, _, how = str(info["decoding"]).partition(" (")  # "dida K=2 (renoise, start=previous)": two lines
    about = [f"model {Path(info['checkpoint']).name}", f"decoding {name}", *([f"  ({how}"] if how else []),
             f"{info['frame_size']}px, {info['tokens_per_frame']} tokens/frame, context {info['context_frames']}"]
    view = WindowView(pygame, session, cfg, about)
    repeat = [k for k, v in cfg.keymap.items() if v in session.commands]
    sources = ([ScriptedKeys(keys)] if keys else []) + [PygameKeys(pygame, repeat)]
    try:
        run_loop(session, ChainedKeys(*sources), view)
    finally:
        view.close()


def explore(cfg: ExploreConfig, env_cfg: EnvConfig, output_dir: Path) -> dict[str, Any] | None:
    """Run the command: headless (returns the summary) or the window (returns None)."""
    keys = scripted_keys(cfg)
    if not cfg.headless:
        reason = no_display_reason()  # before minutes of loading: say at once that no window can open
        if reason is not None:
            raise no_display(reason)
        import_pygame()
    session, info = open_session(cfg, env_cfg)
    try:
        if cfg.headless:
            output_dir.mkdir(parents=True, exist_ok=True)
            return play_headless(session, keys or [], output_dir, env_cfg.fps, info)
        play_window(session, cfg, keys, info)
        return None
    finally:
        session.sim.close()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="explore")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    env_cfg = to_dataclass(EnvConfig, cfg.env)
    explore_cfg = to_dataclass(ExploreConfig, OmegaConf.create({k: v for k, v in cfg.items() if k != "env"}))
    summary = explore(explore_cfg, env_cfg, Path(HydraConfig.get().runtime.output_dir))
    if summary is not None:
        print(f"{summary['n_commands']} commands imagined at {summary['fps']} frames/s; PSNR after 1/8/32: "
              f"{summary['psnr_1']} / {summary['psnr_8']} / {summary['psnr_32']} dB (copy the first frame: "
              f"{summary['copy_first_psnr_1']} / {summary['copy_first_psnr_8']} / {summary['copy_first_psnr_32']}); "
              f"video {summary['video']}", file=sys.stderr, flush=True)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
