"""``explore_room``: a free camera explores a furnished room, driven by discrete commands.

The scene is built in code (no asset files): a rectangular room whose size is drawn per episode
(6-8 m by 5-7 m, walls 2.6 m high, a ceiling), four walls dressed with four different
builtin-texture materials out of six (checker, speckled plaster, panels, radial gradient, grid
lines, small brick-like checker), one of three floors (wood checker, tiles, carpet), a rug, and
6-10 furniture-like objects picked from ten kinds (table with a vase, stacked crates, ball,
barrel, potted plant, floor lamp, chair, bookshelf, sofa, ring tower), each kind at most once,
each in a distinct colour from an 11-colour palette. Objects are placed without overlap with at
least 0.75 m of free floor between any two of them and between a free-standing object and the
walls (the bookshelf and the sofa stand against a wall); as 0.75 m is more than twice the
collision margin, all the floor the camera may stand on is connected. Layout, colours,
materials and the camera start are all drawn from ``self.np_random``. Every object kind and
material is compiled into one model once; a reset only moves bodies, recolours geoms and swaps
wall/floor materials (unused objects are parked under the floor), so resets are cheap and one
renderer serves every episode.

The agent is a camera at eye height 1.35 m on a mocap body (x, y, yaw) with a pitch hinge;
nothing is simulated dynamically: each step sets the pose and runs ``mj_forward``.

Action: one integer in ``Discrete(9)`` (:attr:`ExploreRoomEnv.commands`, in order)::

    0 stay, 1 forward, 2 back, 3 turn left, 4 turn right,
    5 strafe left, 6 strafe right, 7 look up, 8 look down

Moves are 0.2 m (forward/back along the heading, strafes sideways; pitch does not tilt the
motion), turns 15 deg, looks 15 deg with the pitch clamped to +-45 deg. A move that would bring
the camera within 0.3 m (:data:`COLLISION_MARGIN`) of a wall or of an object's floor footprint
is refused: the camera stays and ``info["collided"]`` is True. ``validate_action`` accepts an
int, a 0-d array or a shape-(1,) array holding an integer (integral floats such as 3.0
included) and raises :class:`envs.base.ActionError` for anything else.

``agent_pos`` (observation.state, 4-D float32): x, y (m, room frame centred on the floor),
yaw (rad, 0 = +x, counter-clockwise, wrapped to [-pi, pi)), pitch (rad, + looks up).
Cameras: ``ego`` (the agent's view, fovy 65 deg) and ``overview`` (fixed, high in a corner,
showing the agent as a grey post with an orange heading marker).

Public helpers (used by the explorer and the tests): ``pose``, ``room_half_extents``,
``objects()``, ``clearance(xy)``, ``preview(command)`` / ``would_collide(command)`` (no state
change), ``visible_objects()``, ``seen_objects`` and ``teleport(x, y, yaw, pitch)``.

There is no success condition. ``subtask_progress`` is the number of distinct objects seen so
far this episode: an object counts as seen once one of its look points (its salient part: a
table top, a lamp shade, ...) is within 3.5 m of the camera, inside the ego view (90 % of each
half field of view) and not hidden behind another object (a ray test against object geoms).
The subtasks are the phases of :class:`ExploreRoomExplorer` (look around, four object visits,
then wandering), so ``num_subtasks`` (6) is not an upper bound of the progress.

References: the exploration setting of Emu3.5 (arXiv 2510.26583: text directives driving a
world model through a scene); the command set of keyboard-driven world models (Oasis,
DIAMOND). Departures: a synthetic room of primitives rather than real scans; discrete
commands with fixed step sizes; no physics for the camera body (collision is a 2-D clearance
test against walls and footprints).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Sequence

import mujoco
import numpy as np
from gymnasium import spaces

from envs.base import ActionError, ScriptedExpert, TaskEnv

EYE_HEIGHT = 1.35  # m, camera height above the floor
MOVE_STEP = 0.2  # m per forward/back/strafe command
TURN_STEP = math.radians(15.0)  # rad per turn command
LOOK_STEP = math.radians(15.0)  # rad per look command
MAX_PITCH = math.radians(45.0)  # rad, |pitch| limit
COLLISION_MARGIN = 0.3  # m, closest the camera may come to a wall or an object footprint
EGO_FOVY = 65.0  # deg, vertical field of view of the ego camera
SEEN_DISTANCE = 3.5  # m, farthest an object's look point may be to count as seen
SEEN_FOV_FRACTION = 0.9  # a look point must lie inside 90 % of each half field of view
WALL_HEIGHT = 2.6  # m
WALL_HALF_THICKNESS = 0.05  # m
WALL_HALF_LENGTH = 4.6  # m, walls are long enough for the largest room and overlap at corners
ROOM_HALF_X = (3.0, 4.0)  # m, range of the room's half size along x
ROOM_HALF_Y = (2.5, 3.5)  # m, range of the room's half size along y
NUM_OBJECTS = (6, 10)  # inclusive range of objects per episode
OBJECT_GAP = 0.75  # m, free floor kept between objects and between objects and walls
PARKED_Z = -20.0  # m, where unused objects wait (under the floor, out of every view)
OBJECT_GROUP = 0  # geom group of objects (ray tests for visibility only see this group)
SCENERY_GROUP = 1  # geom group of walls, floor, rug, ceiling and the agent's post

# Object colours: (name, rgb). An episode never repeats a colour.
PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.85, 0.13, 0.12)),
    ("orange", (0.96, 0.50, 0.08)),
    ("yellow", (0.96, 0.84, 0.12)),
    ("green", (0.18, 0.66, 0.22)),
    ("teal", (0.05, 0.58, 0.58)),
    ("blue", (0.14, 0.32, 0.86)),
    ("purple", (0.52, 0.22, 0.74)),
    ("pink", (0.96, 0.48, 0.70)),
    ("white", (0.93, 0.93, 0.90)),
    ("brown", (0.50, 0.31, 0.16)),
    ("black", (0.13, 0.13, 0.14)),
)
# Fixed colours of object parts that do not take the episode's colour.
FIXED_COLOURS: dict[str, tuple[float, float, float]] = {
    "dark": (0.18, 0.15, 0.13),
    "metal": (0.62, 0.63, 0.66),
    "wood": (0.55, 0.38, 0.22),
    "leaf": (0.16, 0.52, 0.18),
    "leaf_light": (0.36, 0.70, 0.26),
    "cream": (0.95, 0.92, 0.84),
    "book_red": (0.70, 0.12, 0.12),
    "book_blue": (0.12, 0.25, 0.62),
    "book_green": (0.15, 0.50, 0.30),
    "book_yellow": (0.90, 0.75, 0.20),
}


# -- geometry -------------------------------------------------------------------------------
def wrap_angle(a: float) -> float:
    """Wrap an angle (rad) to [-pi, pi)."""
    return (a + math.pi) % (2.0 * math.pi) - math.pi


def yaw_quat(yaw: float) -> np.ndarray:
    """Quaternion (w, x, y, z) of a rotation by ``yaw`` rad about +z."""
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


def view_axes(yaw: float, pitch: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit (forward, right, up) vectors of a camera with this yaw and pitch, world frame."""
    cp, sp, cy, sy = math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
    forward = np.array([cy * cp, sy * cp, sp])
    right = np.array([sy, -cy, 0.0])
    up = np.cross(right, forward)
    return forward, right, up


@dataclass(frozen=True)
class Footprint:
    """An object's outline on the floor, metres: a box (``half_extents`` along its own x, y,
    rotated by ``yaw``) or a circle (``radius``), centred at ``centre``."""

    centre: tuple[float, float]
    yaw: float = 0.0
    half_extents: tuple[float, float] | None = None
    radius: float | None = None

    def __post_init__(self) -> None:
        if (self.half_extents is None) == (self.radius is None):
            raise ValueError("a Footprint is either a box (half_extents) or a circle (radius)")

    def distance(self, xy: np.ndarray) -> np.ndarray:
        """Signed distance (m) from points ``xy`` (..., 2) to the outline; < 0 inside."""
        d = np.asarray(xy, dtype=np.float64) - np.asarray(self.centre)
        if self.radius is not None:
            return np.linalg.norm(d, axis=-1) - self.radius
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        local = np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)
        q = np.abs(local) - np.asarray(self.half_extents)  # (..., 2)
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
        inside = np.minimum(q.max(axis=-1), 0.0)
        return outside + inside

    def boundary(self, n: int = 48) -> np.ndarray:
        """``n`` points (n, 2) on the outline, roughly evenly spaced."""
        t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        if self.radius is not None:
            pts = self.radius * np.stack([np.cos(t), np.sin(t)], axis=-1)
        else:
            hx, hy = self.half_extents
            # a square's boundary point in direction t, stretched to the box
            u = np.stack([np.cos(t), np.sin(t)], axis=-1)
            u /= np.abs(u).max(axis=-1, keepdims=True)
            pts = u * np.array([hx, hy])
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        rot = np.array([[c, -s], [s, c]])
        return pts @ rot.T + np.asarray(self.centre)

    @property
    def bounding_radius(self) -> float:
        return self.radius if self.radius is not None else float(np.hypot(*self.half_extents))


# -- object kinds ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One geom of an object kind, in the object's frame (origin on the floor, +x its front).

    ``colour`` is "main" (the episode's colour), "accent" (a darker shade of it) or a key of
    :data:`FIXED_COLOURS`; ``material`` overrides the colour with a model material.
    """

    geom: str  # MuJoCo geom type: box, sphere, cylinder
    size: tuple[float, ...]  # MuJoCo geom size (half extents / radius, half height), m
    pos: tuple[float, float, float]  # m
    colour: str = "main"
    yaw_deg: float = 0.0
    material: str | None = None


@dataclass(frozen=True)
class ObjectKind:
    """A piece of furniture: its geoms, floor footprint and the points that make it 'seen'."""

    name: str
    parts: tuple[Part, ...]
    look_points: tuple[tuple[float, float, float], ...]  # m, object frame
    half_extents: tuple[float, float] | None = None  # box footprint
    radius: float | None = None  # circular footprint
    against_wall: bool = False  # stands with its back (-x) to a wall


def _legs(hx: float, hy: float, height: float, radius: float, colour: str) -> tuple[Part, ...]:
    """Four cylindrical legs at (+-hx, +-hy), from the floor up to ``height``."""
    return tuple(
        Part("cylinder", (radius, height / 2), (sx * hx, sy * hy, height / 2), colour)
        for sx in (-1, 1) for sy in (-1, 1)
    )


def _books() -> tuple[Part, ...]:
    """Rows of books on the bookshelf's levels (fixed pattern: widths, heights, colours)."""
    colours = ("book_red", "book_blue", "book_green", "book_yellow", "cream")
    parts = []
    for level, z0 in enumerate((0.08, 0.465, 0.915, 1.365)):
        y = -0.44 + 0.06 * level
        for i in range(5 + level % 2):
            w = 0.03 + 0.012 * ((i + level) % 3)  # half thickness along y
            h = 0.11 + 0.03 * ((2 * i + level) % 3)  # half height
            parts.append(Part("box", (0.13, w, h), (0.02, y + w, z0 + h),
                              colours[(i + 2 * level) % len(colours)]))
            y += 2 * w + 0.012
    return tuple(parts)


OBJECT_KINDS: tuple[ObjectKind, ...] = (
    ObjectKind(
        "table",
        (Part("box", (0.6, 0.38, 0.025), (0, 0, 0.74)),
         *_legs(0.53, 0.31, 0.715, 0.03, "accent"),
         Part("cylinder", (0.07, 0.09), (0.12, -0.05, 0.855), "cream"),
         Part("sphere", (0.07,), (0.12, -0.05, 0.98), "leaf_light")),
        look_points=((0.0, 0.0, 0.76),), half_extents=(0.6, 0.38)),
    ObjectKind(
        "crates",
        (Part("box", (0.3, 0.3, 0.3), (0, 0, 0.3)),
         Part("box", (0.19, 0.19, 0.19), (0.03, -0.02, 0.79), "accent", yaw_deg=25.0)),
        look_points=((0.0, 0.0, 0.45),), half_extents=(0.3, 0.3)),
    ObjectKind(
        "ball",
        (Part("sphere", (0.32,), (0, 0, 0.32)),),
        look_points=((0.0, 0.0, 0.32),), radius=0.32),
    ObjectKind(
        "barrel",
        (Part("cylinder", (0.27, 0.42), (0, 0, 0.42)),
         Part("cylinder", (0.285, 0.03), (0, 0, 0.2), "accent"),
         Part("cylinder", (0.285, 0.03), (0, 0, 0.64), "accent"),
         Part("cylinder", (0.24, 0.01), (0, 0, 0.845), "accent")),
        look_points=((0.0, 0.0, 0.5),), radius=0.29),
    ObjectKind(
        "plant",
        (Part("cylinder", (0.2, 0.17), (0, 0, 0.17)),
         Part("cylinder", (0.03, 0.25), (0, 0, 0.59), "wood"),
         Part("sphere", (0.32,), (0, 0, 0.88), "leaf"),
         Part("sphere", (0.25,), (0.05, 0.03, 1.2), "leaf_light"),
         Part("sphere", (0.16,), (-0.02, 0.0, 1.45), "leaf")),
        look_points=((0.0, 0.0, 1.0),), radius=0.33),
    ObjectKind(
        "lamp",
        (Part("cylinder", (0.2, 0.02), (0, 0, 0.02), "dark"),
         Part("cylinder", (0.022, 0.72), (0, 0, 0.76), "metal"),
         Part("cylinder", (0.22, 0.14), (0, 0, 1.55)),
         Part("sphere", (0.07,), (0, 0, 1.4), material="bulb")),
        look_points=((0.0, 0.0, 1.5),), radius=0.22),
    ObjectKind(
        "chair",
        (Part("box", (0.24, 0.24, 0.03), (0, 0, 0.46)),
         Part("box", (0.03, 0.24, 0.27), (-0.21, 0, 0.76)),
         *_legs(0.2, 0.2, 0.43, 0.025, "accent")),
        look_points=((0.0, 0.0, 0.55),), half_extents=(0.24, 0.24)),
    ObjectKind(
        "bookshelf",
        (Part("box", (0.2, 0.02, 0.9), (0, -0.5, 0.9)),
         Part("box", (0.2, 0.02, 0.9), (0, 0.5, 0.9)),
         Part("box", (0.2, 0.52, 0.02), (0, 0, 1.78)),
         Part("box", (0.2, 0.48, 0.04), (0, 0, 0.04)),
         Part("box", (0.01, 0.48, 0.86), (-0.19, 0, 0.9), "accent"),
         *(Part("box", (0.19, 0.48, 0.015), (0, 0, z)) for z in (0.45, 0.9, 1.35)),
         *_books()),
        look_points=((0.0, 0.0, 0.9), (0.0, 0.0, 1.4)), half_extents=(0.2, 0.52),
        against_wall=True),
    ObjectKind(
        "sofa",
        (Part("box", (0.42, 0.9, 0.2), (0.03, 0, 0.22)),
         Part("box", (0.12, 0.9, 0.33), (-0.33, 0, 0.55)),
         Part("box", (0.45, 0.1, 0.14), (0, -0.9, 0.52)),
         Part("box", (0.45, 0.1, 0.14), (0, 0.9, 0.52)),
         Part("box", (0.34, 0.39, 0.06), (0.06, -0.4, 0.48), "accent"),
         Part("box", (0.34, 0.39, 0.06), (0.06, 0.4, 0.48), "accent")),
        look_points=((0.0, 0.0, 0.5),), half_extents=(0.45, 1.0), against_wall=True),
    ObjectKind(
        "ring tower",
        (Part("cylinder", (0.3, 0.05), (0, 0, 0.05), "dark"),
         Part("cylinder", (0.27, 0.06), (0, 0, 0.16)),
         Part("cylinder", (0.23, 0.06), (0, 0, 0.28), "cream"),
         Part("cylinder", (0.19, 0.06), (0, 0, 0.40)),
         Part("cylinder", (0.15, 0.06), (0, 0, 0.52), "cream"),
         Part("cylinder", (0.11, 0.06), (0, 0, 0.64)),
         Part("sphere", (0.1,), (0, 0, 0.78), "accent")),
        look_points=((0.0, 0.0, 0.4),), radius=0.3),
)
KIND_BY_NAME = {k.name: k for k in OBJECT_KINDS}

# Materials (builtin textures; no files). Walls draw four distinct ones per episode.
WALL_MATERIALS = ("wall_checker", "wall_plaster", "wall_panels", "wall_gradient", "wall_cross",
                  "wall_brick")
FLOOR_MATERIALS = ("floor_wood", "floor_tiles", "floor_carpet")
RUG_TINTS = ((1.0, 0.85, 0.85), (0.85, 0.9, 1.0), (0.9, 1.0, 0.85), (1.0, 1.0, 0.8), (1.0, 1.0, 1.0))

_ASSETS_XML = """
    <texture name="t_wall_checker" type="2d" builtin="checker" width="256" height="256"
             rgb1="0.86 0.80 0.70" rgb2="0.76 0.70 0.60"/>
    <texture name="t_wall_plaster" type="2d" builtin="flat" width="256" height="256"
             rgb1="0.74 0.82 0.88" mark="random" random="0.08" markrgb="0.55 0.62 0.72"/>
    <texture name="t_wall_panels" type="2d" builtin="flat" width="256" height="256"
             rgb1="0.80 0.90 0.78" mark="edge" markrgb="0.45 0.58 0.45"/>
    <texture name="t_wall_gradient" type="2d" builtin="gradient" width="256" height="256"
             rgb1="0.97 0.86 0.74" rgb2="0.66 0.50 0.46"/>
    <texture name="t_wall_cross" type="2d" builtin="flat" width="256" height="256"
             rgb1="0.92 0.80 0.86" mark="cross" markrgb="0.60 0.45 0.55"/>
    <texture name="t_wall_brick" type="2d" builtin="checker" width="256" height="256"
             rgb1="0.70 0.38 0.30" rgb2="0.62 0.33 0.26"/>
    <texture name="t_floor_wood" type="2d" builtin="checker" width="256" height="256"
             rgb1="0.62 0.46 0.30" rgb2="0.54 0.39 0.25"/>
    <texture name="t_floor_tiles" type="2d" builtin="flat" width="256" height="256"
             rgb1="0.88 0.88 0.86" mark="edge" markrgb="0.45 0.45 0.48"/>
    <texture name="t_floor_carpet" type="2d" builtin="flat" width="256" height="256"
             rgb1="0.42 0.46 0.55" mark="random" random="0.15" markrgb="0.30 0.33 0.40"/>
    <texture name="t_rug" type="2d" builtin="checker" width="256" height="256"
             rgb1="0.80 0.25 0.25" rgb2="0.95 0.85 0.60"/>
    <material name="wall_checker" texture="t_wall_checker" texrepeat="2 2" texuniform="true"/>
    <material name="wall_plaster" texture="t_wall_plaster" texrepeat="0.5 0.5" texuniform="true"/>
    <material name="wall_panels" texture="t_wall_panels" texrepeat="1 1" texuniform="true"/>
    <material name="wall_gradient" texture="t_wall_gradient" texrepeat="0.4 0.4" texuniform="true"/>
    <material name="wall_cross" texture="t_wall_cross" texrepeat="2 2" texuniform="true"/>
    <material name="wall_brick" texture="t_wall_brick" texrepeat="3 6" texuniform="true"/>
    <material name="floor_wood" texture="t_floor_wood" texrepeat="3 1" texuniform="true"/>
    <material name="floor_tiles" texture="t_floor_tiles" texrepeat="2 2" texuniform="true"/>
    <material name="floor_carpet" texture="t_floor_carpet" texrepeat="0.5 0.5" texuniform="true"/>
    <material name="rug" texture="t_rug" texrepeat="4 4" texuniform="true"/>
    <material name="ceiling" rgba="0.95 0.95 0.93 1" emission="0.3"/>
    <material name="bulb" rgba="1.0 0.92 0.6 1" emission="1"/>
"""


def _fmt(values: Sequence[float]) -> str:
    return " ".join(f"{v:.4g}" for v in values)


def body_name(kind: ObjectKind) -> str:
    return "obj_" + kind.name.replace(" ", "_")


def _object_xml(kind: ObjectKind) -> str:
    geoms = []
    for i, p in enumerate(kind.parts):
        look = (f'material="{p.material}"' if p.material
                else f'rgba="{_fmt((*FIXED_COLOURS.get(p.colour, (0.5, 0.5, 0.5)), 1.0))}"')
        geoms.append(
            f'<geom name="{body_name(kind)}_{i}" type="{p.geom}" size="{_fmt(p.size)}" '
            f'pos="{_fmt(p.pos)}" euler="0 0 {p.yaw_deg:.4g}" {look} group="{OBJECT_GROUP}"/>'
        )
    return (f'<body name="{body_name(kind)}" pos="0 0 {PARKED_Z}">\n      '
            + "\n      ".join(geoms) + "\n    </body>")


def build_room_xml() -> str:
    """The MJCF of the room with every object kind (parked) and the camera agent."""
    # Each wall box has its local x along the wall and local y up, so that its faces towards
    # the room are local x-y planes, where MuJoCo maps 2-D textures without stretching.
    wall_axes = {"wall_px": "0 1 0 0 0 1", "wall_nx": "0 1 0 0 0 1",
                 "wall_py": "1 0 0 0 0 1", "wall_ny": "1 0 0 0 0 1"}
    size = _fmt((WALL_HALF_LENGTH, WALL_HEIGHT / 2, WALL_HALF_THICKNESS))
    walls = "\n    ".join(
        f'<geom name="{n}" type="box" size="{size}" xyaxes="{axes}" material="{WALL_MATERIALS[i]}" '
        f'group="{SCENERY_GROUP}"/>' for i, (n, axes) in enumerate(wall_axes.items())
    )
    objects = "\n    ".join(_object_xml(k) for k in OBJECT_KINDS)
    return f"""<mujoco model="explore_room">
  <compiler angle="degree"/>
  <option timestep="0.1"/>
  <statistic extent="8" center="0 0 1"/>
  <visual>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.4 0.4 0.4" specular="0.02 0.02 0.02"/>
    <map znear="0.005"/>
  </visual>
  <asset>{_ASSETS_XML}  </asset>
  <worldbody>
    <light directional="true" dir="0.3 0.2 -1" diffuse="0.35 0.35 0.35" specular="0 0 0"
           castshadow="false"/>
    <light directional="true" dir="-0.3 -0.4 -1" diffuse="0.2 0.2 0.2" specular="0 0 0"
           castshadow="false"/>
    <geom name="floor" type="plane" size="5 5 0.1" material="floor_wood" group="{SCENERY_GROUP}"/>
    <geom name="ceiling" type="box" size="5 5 0.05" pos="0 0 {WALL_HEIGHT + 0.05}"
          material="ceiling" group="{SCENERY_GROUP}"/>
    <geom name="rug" type="box" size="1 0.7 0.004" pos="0 0 0.004" material="rug"
          group="{SCENERY_GROUP}"/>
    {walls}
    <camera name="overview" pos="3 -2.5 2.35" fovy="80"/>
    {objects}
    <body name="agent" mocap="true">
      <geom name="agent_post" type="capsule" fromto="0 0 0.12 0 0 0.75" size="0.07"
            rgba="0.55 0.55 0.58 1" group="{SCENERY_GROUP}"/>
      <geom name="agent_base" type="cylinder" size="0.18 0.02" pos="0 0 0.02"
            rgba="0.3 0.3 0.33 1" group="{SCENERY_GROUP}"/>
      <geom name="agent_heading" type="box" size="0.1 0.03 0.025" pos="0.15 0 0.045"
            rgba="1 0.45 0.05 1" group="{SCENERY_GROUP}"/>
      <body name="head" pos="0 0 {EYE_HEIGHT}">
        <joint name="pitch" type="hinge" axis="0 -1 0" range="-45 45"/>
        <inertial pos="0 0 0" mass="0.1" diaginertia="1e-3 1e-3 1e-3"/>
        <camera name="ego" pos="0 0 0" xyaxes="0 -1 0 0 0 1" fovy="{EGO_FOVY}"/>
      </body>
    </body>
  </worldbody>
</mujoco>
"""


@dataclass(frozen=True)
class RoomObject:
    """An object placed in this episode's room."""

    name: str  # "<colour> <kind>", e.g. "blue barrel"
    kind: str
    colour: str
    footprint: Footprint
    look_points: np.ndarray  # (k, 3) m, world frame

    @property
    def position(self) -> np.ndarray:
        """(2,) m, the footprint centre on the floor."""
        return np.asarray(self.footprint.centre)


# -- env ------------------------------------------------------------------------------------
class ExploreRoomEnv(TaskEnv):
    """A camera explores a randomly furnished room by discrete commands (see module doc)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    has_success = False  # open-ended: there is nothing to succeed at
    task: ClassVar[str] = "explore the room"
    subtasks: ClassVar[tuple[str, ...]] = (
        "look around the room",
        "walk to an object",
        "walk to another object",
        "walk to a third object",
        "walk to a fourth object",
        "wander around the room",
    )
    camera_names: ClassVar[tuple[str, ...]] = ("ego", "overview")
    default_cameras: ClassVar[tuple[str, ...]] = ("ego",)
    control_hz: ClassVar[float] = 10.0
    action_names: ClassVar[tuple[str, ...]] = ("command",)
    state_names: ClassVar[tuple[str, ...]] = ("x", "y", "yaw", "pitch")
    commands: ClassVar[tuple[str, ...]] = (
        "stay", "forward", "back", "turn left", "turn right",
        "strafe left", "strafe right", "look up", "look down",
    )
    collision_margin: ClassVar[float] = COLLISION_MARGIN

    def __init__(self, render_mode: str | None = "rgb_array", cameras: Sequence[str] | None = None,
                 image_size: int | Sequence[int] = 128, observe_pixels: bool = True):
        super().__init__(render_mode=render_mode, cameras=cameras, image_size=image_size,
                         observe_pixels=observe_pixels)
        self.model = mujoco.MjModel.from_xml_string(build_room_xml())
        self.data = mujoco.MjData(self.model)
        self._setup(np.zeros(1), np.array([len(self.commands) - 1.0]))
        self.action_space = spaces.Discrete(len(self.commands))

        m = self.model
        self._agent_mocap = int(m.body_mocapid[m.body("agent").id])
        self._pitch_qpos = int(m.jnt_qposadr[m.joint("pitch").id])
        self._overview_cam = m.camera("overview").id
        self._walls = {n: m.geom(n).id for n in ("wall_px", "wall_nx", "wall_py", "wall_ny")}
        self._floor = m.geom("floor").id
        self._rug = m.geom("rug").id
        self._rug_mat = m.material("rug").id
        # Walls and rug move per episode: MuJoCo reuses the body's position or orientation for
        # geoms compiled with a zero offset or rotation ("sameframe"), which would ignore the
        # new geom_pos / geom_quat.
        m.geom_sameframe[[*self._walls.values(), self._rug]] = mujoco.mjtSameFrame.mjSAMEFRAME_NONE
        self._material_ids = {n: m.material(n).id for n in (*WALL_MATERIALS, *FLOOR_MATERIALS)}
        self._body_ids = {k.name: m.body(body_name(k)).id for k in OBJECT_KINDS}
        # per kind: geom ids taking the main colour and the accent colour
        self._colour_geoms: dict[str, tuple[list[int], list[int]]] = {}
        for k in OBJECT_KINDS:
            main = [m.geom(f"{body_name(k)}_{i}").id for i, p in enumerate(k.parts)
                    if p.colour == "main" and p.material is None]
            accent = [m.geom(f"{body_name(k)}_{i}").id for i, p in enumerate(k.parts)
                      if p.colour == "accent" and p.material is None]
            self._colour_geoms[k.name] = (main, accent)
        self._ray_groups = np.zeros(mujoco.mjNGROUP, dtype=np.uint8)
        self._ray_groups[OBJECT_GROUP] = 1
        self._ray_geom = np.zeros(1, dtype=np.int32)

        self._room_half = (3.0, 2.5)
        self._objects: tuple[RoomObject, ...] = ()
        self._pose = np.zeros(4)  # x, y, yaw, pitch
        self._seen: list[str] = []  # object names in the order they were first seen
        self._collided = False

    # -- commands and validation ----------------------------------------------------------
    @classmethod
    def command_index(cls, command: str) -> int:
        """Index of a command string ("forward" -> 1)."""
        try:
            return cls.commands.index(command)
        except ValueError:
            raise ValueError(f"unknown command {command!r}; commands: {list(cls.commands)}") from None

    def validate_action(self, action) -> np.ndarray:
        """Accept an integer command index (int, 0-d or shape-(1,) array); returns a 0-d int64."""
        name = type(self).__name__
        n = len(self.commands)
        hint = f"use an integer 0..{n - 1} ({', '.join(f'{i} {c}' for i, c in enumerate(self.commands))})"
        a = np.asarray(action)
        if a.shape not in ((), (1,)):
            raise ActionError(f"{name}: action has shape {a.shape}, expected a single command index; {hint}")
        if a.dtype.kind not in "iuf":
            raise ActionError(f"{name}: action {action!r} (dtype {a.dtype}) is not a number; {hint}. "
                              f"Map command names with {name}.command_index().")
        value = a.reshape(()).item()
        if a.dtype.kind == "f":
            if not math.isfinite(value):
                raise ActionError(f"{name}: action is non-finite ({value}); nothing was done. {hint}")
            if value != round(value):
                raise ActionError(f"{name}: action {value} is not an integer; {hint}")
        index = int(round(value))
        if not 0 <= index < n:
            raise ActionError(f"{name}: action {index} is out of range; {hint}")
        self.action_clipped = False
        return np.array(index, dtype=np.int64)

    # -- public state -----------------------------------------------------------------------
    @property
    def pose(self) -> np.ndarray:
        """(4,) float64: x (m), y (m), yaw (rad), pitch (rad)."""
        return self._pose.copy()

    @property
    def room_half_extents(self) -> tuple[float, float]:
        """Half size (m) of the room's floor along x and y; the room is centred at the origin."""
        return self._room_half

    def objects(self) -> tuple[RoomObject, ...]:
        """The objects of this episode."""
        return self._objects

    @property
    def seen_objects(self) -> tuple[str, ...]:
        """Names of the objects seen so far, in the order they were first seen."""
        return tuple(self._seen)

    def clearance(self, xy: np.ndarray) -> np.ndarray:
        """Distance (m) from floor points ``xy`` (..., 2) to the nearest wall or object footprint
        (negative inside an obstacle or outside the room)."""
        p = np.asarray(xy, dtype=np.float64)
        hx, hy = self._room_half
        d = np.minimum(hx - np.abs(p[..., 0]), hy - np.abs(p[..., 1]))
        for obj in self._objects:
            d = np.minimum(d, obj.footprint.distance(p))
        return d

    def preview(self, command: int | str) -> tuple[np.ndarray, bool]:
        """The pose (4,) a command would lead to and whether it would collide; changes nothing.

        A colliding move returns the current pose (the command is refused)."""
        index = self.command_index(command) if isinstance(command, str) else int(command)
        if not 0 <= index < len(self.commands):
            raise ValueError(f"command {command!r} out of range 0..{len(self.commands) - 1}")
        x, y, yaw, pitch = self._pose
        name = self.commands[index]
        step = {"forward": (1, 0), "back": (-1, 0), "strafe left": (0, 1), "strafe right": (0, -1)}
        if name in step:
            fwd, left = step[name]
            dx = MOVE_STEP * (fwd * math.cos(yaw) - left * math.sin(yaw))
            dy = MOVE_STEP * (fwd * math.sin(yaw) + left * math.cos(yaw))
            # the end point and the mid point: a 0.2 m step cannot jump over a 0.3 m margin
            path = np.array([[x + dx / 2, y + dy / 2], [x + dx, y + dy]])
            if self.clearance(path).min() < COLLISION_MARGIN:
                return self._pose.copy(), True
            return np.array([x + dx, y + dy, yaw, pitch]), False
        if name in ("turn left", "turn right"):
            sign = 1.0 if name == "turn left" else -1.0
            return np.array([x, y, wrap_angle(yaw + sign * TURN_STEP), pitch]), False
        if name in ("look up", "look down"):
            sign = 1.0 if name == "look up" else -1.0
            new_pitch = float(np.clip(pitch + sign * LOOK_STEP, -MAX_PITCH, MAX_PITCH))
            return np.array([x, y, yaw, new_pitch]), False
        return self._pose.copy(), False  # stay

    def would_collide(self, command: int | str) -> bool:
        """True if the command is a move that the env would refuse."""
        return self.preview(command)[1]

    def teleport(self, x: float, y: float, yaw: float = 0.0, pitch: float = 0.0) -> None:
        """Put the camera at a pose (for tests and demos); refuses poses inside the margin."""
        if float(self.clearance(np.array([x, y]))) < COLLISION_MARGIN:
            raise ValueError(f"pose ({x:.2f}, {y:.2f}) is within {COLLISION_MARGIN} m of an obstacle")
        self._set_pose(np.array([x, y, wrap_angle(yaw), float(np.clip(pitch, -MAX_PITCH, MAX_PITCH))]))
        self._update_seen()

    def visible_objects(self) -> tuple[str, ...]:
        """Names of the objects that count as seen from the current pose (see module doc)."""
        x, y, yaw, pitch = self._pose
        eye = np.array([x, y, EYE_HEIGHT])
        forward, right, up = view_axes(yaw, pitch)
        h, w = self.image_size
        tan_v = math.tan(math.radians(EGO_FOVY) / 2) * SEEN_FOV_FRACTION
        tan_h = math.tan(math.radians(EGO_FOVY) / 2) * (w / h) * SEEN_FOV_FRACTION
        visible = []
        for obj in self._objects:
            for point in obj.look_points:
                v = point - eye
                dist = float(np.linalg.norm(v))
                depth = float(v @ forward)
                if dist > SEEN_DISTANCE or depth <= 1e-6:
                    continue
                if abs(v @ right) > tan_h * depth or abs(v @ up) > tan_v * depth:
                    continue
                hit = mujoco.mj_ray(self.model, self.data, eye, v / dist, self._ray_groups, 1, -1,
                                    self._ray_geom)
                gid = int(self._ray_geom[0])
                if gid < 0 or hit >= dist or self.model.geom_bodyid[gid] == self._body_ids[obj.kind]:
                    visible.append(obj.name)
                    break
        return tuple(visible)

    # -- TaskEnv hooks ----------------------------------------------------------------------
    def _randomize(self, rng: np.random.Generator, options: dict) -> None:
        m = self.model
        mujoco.mj_resetData(m, self.data)
        hx = float(rng.uniform(*ROOM_HALF_X))
        hy = float(rng.uniform(*ROOM_HALF_Y))
        self._room_half = (hx, hy)
        self._dress_room(rng, hx, hy)
        self._objects = self._place_objects(rng, hx, hy)
        for kind in OBJECT_KINDS:  # park everything, then bring the episode's objects in
            m.body_pos[self._body_ids[kind.name]] = (0.0, 0.0, PARKED_Z)
        for obj in self._objects:
            bid = self._body_ids[obj.kind]
            m.body_pos[bid] = (*obj.footprint.centre, 0.0)
            m.body_quat[bid] = yaw_quat(obj.footprint.yaw)
            rgb = np.array(dict(PALETTE)[obj.colour])
            main, accent = self._colour_geoms[obj.kind]
            m.geom_rgba[main] = (*rgb, 1.0)
            m.geom_rgba[accent] = (*(0.55 * rgb + 0.08), 1.0)
        # overview camera: in the (+x, -y) corner under the ceiling, looking across the room
        cam_pos = np.array([hx - 0.15, -hy + 0.15, WALL_HEIGHT - 0.25])
        m.cam_pos[self._overview_cam] = cam_pos
        m.cam_quat[self._overview_cam] = look_at_quat(cam_pos, np.array([-0.4 * hx, 0.4 * hy, 0.3]))

        # the camera starts at a random spot with some room around it, facing anywhere
        free = np.zeros((0, 2))
        while len(free) == 0:
            cand = rng.uniform([-hx, -hy], [hx, hy], size=(64, 2))
            free = cand[self.clearance(cand) >= COLLISION_MARGIN + 0.2]
        x, y = free[0]
        self._seen = []
        self._collided = False
        self._set_pose(np.array([x, y, wrap_angle(float(rng.uniform(-math.pi, math.pi))), 0.0]))
        self._update_seen()

    def _dress_room(self, rng: np.random.Generator, hx: float, hy: float) -> None:
        """Move the walls to the room size and pick wall, floor and rug looks."""
        m = self.model
        t = WALL_HALF_THICKNESS
        centres = {"wall_px": (hx + t, 0.0), "wall_nx": (-hx - t, 0.0),
                   "wall_py": (0.0, hy + t), "wall_ny": (0.0, -hy - t)}
        materials = rng.choice(len(WALL_MATERIALS), size=4, replace=False)
        for (name, (cx, cy)), mat in zip(centres.items(), materials):
            gid = self._walls[name]
            m.geom_pos[gid] = (cx, cy, WALL_HEIGHT / 2)
            m.geom_matid[gid] = self._material_ids[WALL_MATERIALS[mat]]
        m.geom_matid[self._floor] = self._material_ids[FLOOR_MATERIALS[rng.integers(len(FLOOR_MATERIALS))]]
        rug_half = rng.uniform([0.7, 0.5], [1.3, 0.9])
        m.geom_size[self._rug] = (*rug_half, 0.004)
        m.geom_pos[self._rug] = (*rng.uniform(-0.3, 0.3, size=2) * [hx, hy], 0.004)
        m.geom_quat[self._rug] = yaw_quat(float(rng.choice([0.0, math.pi / 2])))
        m.mat_rgba[self._rug_mat] = (*RUG_TINTS[rng.integers(len(RUG_TINTS))], 1.0)

    @staticmethod
    def _place_objects(rng: np.random.Generator, hx: float, hy: float) -> tuple[RoomObject, ...]:
        """Sample 6-10 distinct kinds with distinct colours and non-overlapping footprints.

        A kind that finds no free spot is dropped; layouts with fewer than 6 objects are
        resampled (with the same kinds), which keeps the count in range in small rooms too.
        """
        n = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
        for _ in range(100):
            placed = ExploreRoomEnv._try_layout(rng, n, hx, hy)
            if len(placed) >= NUM_OBJECTS[0]:
                return placed
        raise RuntimeError(f"could not fit {NUM_OBJECTS[0]} objects in a {2 * hx:.1f} x {2 * hy:.1f} m room")

    @staticmethod
    def _try_layout(rng: np.random.Generator, n: int, hx: float, hy: float) -> tuple[RoomObject, ...]:
        """One attempt at placing ``n`` random kinds; kinds that do not fit are left out."""
        kinds = [OBJECT_KINDS[i] for i in rng.choice(len(OBJECT_KINDS), size=n, replace=False)]
        colours = [PALETTE[i][0] for i in rng.choice(len(PALETTE), size=n, replace=False)]
        # big and wall-bound kinds first: they are the hardest to fit
        order = sorted(range(n), key=lambda i: (not kinds[i].against_wall,
                                                -Footprint((0, 0), 0, kinds[i].half_extents,
                                                           kinds[i].radius).bounding_radius))
        placed: list[RoomObject] = []
        for i in order:
            kind = kinds[i]
            for _ in range(100):
                fp = _sample_footprint(rng, kind, hx, hy)
                boundary = fp.boundary()
                if all(other.footprint.distance(boundary).min() >= OBJECT_GAP for other in placed):
                    break
            else:  # no room left for this kind in this room: the episode has one object fewer
                continue
            c, s = math.cos(fp.yaw), math.sin(fp.yaw)
            local = np.array(kind.look_points)
            world = np.stack([fp.centre[0] + c * local[:, 0] - s * local[:, 1],
                              fp.centre[1] + s * local[:, 0] + c * local[:, 1], local[:, 2]], axis=-1)
            placed.append(RoomObject(f"{colours[i]} {kind.name}", kind.name, colours[i], fp, world))
        return tuple(placed)

    def _set_pose(self, pose: np.ndarray) -> None:
        self._pose = np.asarray(pose, dtype=np.float64).copy()
        x, y, yaw, pitch = self._pose
        self.data.mocap_pos[self._agent_mocap] = (x, y, 0.0)
        self.data.mocap_quat[self._agent_mocap] = yaw_quat(yaw)
        self.data.qpos[self._pitch_qpos] = pitch
        mujoco.mj_forward(self.model, self.data)

    def _update_seen(self) -> None:
        for name in self.visible_objects():
            if name not in self._seen:
                self._seen.append(name)

    def _apply_action(self, action: np.ndarray) -> None:
        pose, self._collided = self.preview(int(action))
        if not np.array_equal(pose, self._pose):
            self._set_pose(pose)
            self._update_seen()

    def _state(self) -> np.ndarray:
        return self._pose.astype(np.float32)

    def _evaluate(self) -> tuple[bool, int]:
        return False, len(self._seen)

    def _info(self) -> dict:
        info = super()._info()
        info["collided"] = self._collided
        return info


def _sample_footprint(rng: np.random.Generator, kind: ObjectKind, hx: float, hy: float) -> Footprint:
    """A random footprint for ``kind``: against a random wall (back to it) or free-standing
    at least :data:`OBJECT_GAP` from the walls, with a random heading."""
    if kind.against_wall:
        ex, ey = kind.half_extents  # depth from the wall, half width along it
        wall = int(rng.integers(4))  # +x, -x, +y, -y
        along_half = hy if wall < 2 else hx
        t = float(rng.uniform(-along_half + ey + 0.05, along_half - ey - 0.05))
        gap = 0.03  # m between the object's back and the wall
        if wall == 0:
            return Footprint((hx - ex - gap, t), math.pi, kind.half_extents)
        if wall == 1:
            return Footprint((-hx + ex + gap, t), 0.0, kind.half_extents)
        if wall == 2:
            return Footprint((t, hy - ex - gap), -math.pi / 2, kind.half_extents)
        return Footprint((t, -hy + ex + gap), math.pi / 2, kind.half_extents)
    yaw = float(rng.uniform(-math.pi, math.pi))
    outline = Footprint((0.0, 0.0), yaw, kind.half_extents, kind.radius).boundary()  # (n, 2)
    lo = -np.array([hx, hy]) + OBJECT_GAP - outline.min(axis=0)  # exact wall gap of this outline
    hi = np.array([hx, hy]) - OBJECT_GAP - outline.max(axis=0)
    centre = rng.uniform(lo, hi)
    return Footprint((float(centre[0]), float(centre[1])), yaw, kind.half_extents, kind.radius)


def look_at_quat(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Quaternion (w, x, y, z) of a MuJoCo camera at ``pos`` looking at ``target``, x-axis level."""
    forward = target - pos
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    mat = np.stack([right, up, -forward], axis=1)  # camera axes as columns
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, mat.reshape(-1))
    return quat


# -- scripted explorer ----------------------------------------------------------------------
STAY, FORWARD, BACK, TURN_LEFT, TURN_RIGHT, STRAFE_LEFT, STRAFE_RIGHT, LOOK_UP, LOOK_DOWN = range(9)
PLAN_RESOLUTION = 0.1  # m, cell size of the explorer's occupancy grid
PLAN_CLEARANCE = COLLISION_MARGIN + 0.05  # m, clearance a cell needs to be planned through
LOS_CLEARANCE = COLLISION_MARGIN + 0.08  # m, clearance along a straight shortcut of the path
LOOKAHEAD = 1.5  # m, farthest path point the explorer heads for directly
HEADING_TOLERANCE = math.radians(11.0)  # rad, heading error below which the explorer walks on
ARRIVE_DISTANCE = 0.15  # m, a goal closer than this is reached
VISIT_STANDOFF = 0.5  # m, visit spots lie up to this much beyond PLAN_CLEARANCE from an object
GOAL_STEP_LIMIT = 90  # steps after which an unreached goal is given up
PROGRESS_STEP_LIMIT = 25  # steps without passing a path point after which the goal is given up
COVER_RADIUS = 0.75  # m, floor within this distance of the camera's path counts as covered
NUM_VISITS = 4  # object visits, subtasks 1..4 of ExploreRoomEnv.subtasks
WANDER_PHASE = NUM_VISITS + 1  # the last subtask


class PlanGrid:
    """The room's floor as a grid of cells (``PLAN_RESOLUTION``) for breadth-first planning.

    ``centres`` (nx, ny, 2) are cell centres (m); ``free`` (nx, ny) marks cells with at least
    ``PLAN_CLEARANCE`` to every wall and object footprint (from :meth:`ExploreRoomEnv.clearance`).
    """

    def __init__(self, env: ExploreRoomEnv):
        hx, hy = env.room_half_extents
        xs = np.arange(-hx + PLAN_RESOLUTION / 2, hx, PLAN_RESOLUTION)
        ys = np.arange(-hy + PLAN_RESOLUTION / 2, hy, PLAN_RESOLUTION)
        self.centres = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1)  # (nx, ny, 2)
        self.free = env.clearance(self.centres) >= PLAN_CLEARANCE  # (nx, ny)

    def nearest_free(self, xy: np.ndarray) -> tuple[int, int]:
        d = np.linalg.norm(self.centres - xy, axis=-1)
        d[~self.free] = np.inf
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        return int(i), int(j)

    def distances(self, start: tuple[int, int]) -> np.ndarray:
        """4-connected breadth-first step counts (nx, ny) from ``start``; -1 where unreachable."""
        dist = np.full(self.free.shape, -1, dtype=np.int32)
        dist[start] = 0
        frontier = np.zeros_like(self.free)
        frontier[start] = True
        step = 0
        while frontier.any():
            step += 1
            grown = np.zeros_like(frontier)
            grown[1:] |= frontier[:-1]
            grown[:-1] |= frontier[1:]
            grown[:, 1:] |= frontier[:, :-1]
            grown[:, :-1] |= frontier[:, 1:]
            frontier = grown & self.free & (dist < 0)
            dist[frontier] = step
        return dist

    def path(self, dist: np.ndarray, goal: tuple[int, int]) -> list[np.ndarray]:
        """Cell centres from the start of ``dist`` to ``goal`` (a reachable cell), descending ``dist``."""
        i, j = goal
        cells = [(i, j)]
        while dist[i, j] > 0:
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if 0 <= a < dist.shape[0] and 0 <= b < dist.shape[1] and dist[a, b] == dist[i, j] - 1:
                    i, j = a, b
                    break
            cells.append((i, j))
        return [self.centres[c] for c in reversed(cells)]


class ExploreRoomExplorer(ScriptedExpert):
    """Scripted exploration: look around, visit four objects, then wander (the 6 subtasks).

    Visits pick an unvisited object (nearer ones more likely), walk to a random spot 0.35-0.85 m
    from its footprint along a breadth-first path on :class:`PlanGrid` (heading for the farthest
    path point in line of sight within 1.5 m: turn until the heading is within 11 deg, then
    forward), then face the object, tilt towards it, pause and sometimes back off.
    Wandering walks to random reachable spots, favouring floor not covered yet, and does a
    partial look-around, a strafe burst, a nod or a pause at each. Strafes, back steps, pauses
    and pitch changes are mixed in at random while walking. Every move is checked with
    :meth:`ExploreRoomEnv.would_collide` before it is issued; a blocked move triggers a
    sidestep, a re-plan or a new goal, so the explorer never collides. Randomness comes from a
    generator seeded from ``env.np_random`` at reset: episodes differ across seeds and repeat
    under the same seed.
    """

    env: ExploreRoomEnv

    def reset(self, obs: dict, info: dict) -> None:
        env = self.env
        self.rng = np.random.default_rng(int(env.np_random.integers(2**63)))
        self.subtask_index = 0
        self.grid = PlanGrid(env)
        self.covered = np.zeros(self.grid.free.shape, dtype=bool)  # (nx, ny)
        self.queue: deque[int] = deque(self._look_around())
        self.goal: np.ndarray | None = None  # (2,) m
        self.goal_object: RoomObject | None = None
        self.path: list[np.ndarray] = []
        self.goal_steps = 0
        self.progress_steps = 0
        self.blocked = 0
        self.visits_done = 0
        self.skipped: set[str] = set()  # objects visited or found unreachable
        self.walk_pitch = 0.0

    def act(self, obs: dict, info: dict) -> np.ndarray:
        self._cover(self.env.pose[:2])
        for _ in range(6):  # a few goal changes at most; each returns None once
            command = self._next_command()
            if command is not None:
                return np.array([command], dtype=np.int64)
        return np.array([STAY], dtype=np.int64)

    # -- decisions --------------------------------------------------------------------------
    def _next_command(self) -> int | None:
        while self.queue:
            command = self.queue.popleft()
            if not self.env.would_collide(command):
                return command
            self.queue.clear()  # a scripted move is blocked: drop the rest of the script
        if self.goal is not None:
            return self._walk()
        self._choose_goal()
        return None

    def _choose_goal(self) -> None:
        phase = 1 + self.visits_done  # subtasks 1..NUM_VISITS are the visits
        if phase <= NUM_VISITS and self._choose_object_goal():
            self.subtask_index = max(self.subtask_index, phase)
            return
        self.subtask_index = WANDER_PHASE
        self._choose_wander_goal()

    def _reachable(self) -> np.ndarray:
        return self.grid.distances(self.grid.nearest_free(self.env.pose[:2]))

    def _choose_object_goal(self) -> bool:
        dist = self._reachable()
        options = []  # (object, candidate cells (k, 2), their step counts (k,))
        for obj in self.env.objects():
            if obj.name in self.skipped:
                continue
            d_obj = obj.footprint.distance(self.grid.centres)
            ok = (dist >= 0) & (d_obj <= PLAN_CLEARANCE + VISIT_STANDOFF)
            if ok.any():
                cells = np.argwhere(ok)
                options.append((obj, cells, dist[ok]))
        if not options:
            return False
        cost = np.array([steps.min() * PLAN_RESOLUTION for _, _, steps in options])  # m
        # objects right beside the camera make dull visits: prefer ones 1 m or more away
        weights = np.exp(-(cost - cost.min()) / 3.0) * np.where(cost >= 1.0, 1.0, 0.05)
        obj, cells, steps = options[self.rng.choice(len(options), p=weights / weights.sum())]
        near = cells[steps <= steps.min() + 10]  # the near side of the object
        goal = tuple(near[self.rng.integers(len(near))])
        self.goal_object = obj
        self._set_goal(dist, goal)
        return True

    def _choose_wander_goal(self) -> None:
        dist = self._reachable()
        here = self.env.pose[:2]
        far = np.linalg.norm(self.grid.centres - here, axis=-1)
        ok = (dist >= 0) & (far >= 1.5) & (far <= 4.5)
        if not ok.any():
            ok = dist > 0
        if not ok.any():  # boxed in (cannot happen with the env's layout gaps): look around
            self.queue.extend(self._look_around())
            return
        cells = np.argwhere(ok)
        weights = 1.0 + 4.0 * ~self.covered[ok]
        goal = tuple(cells[self.rng.choice(len(cells), p=weights / weights.sum())])
        self.goal_object = None
        self._set_goal(dist, goal)

    def _set_goal(self, dist: np.ndarray, goal: tuple[int, int]) -> None:
        self.path = self.grid.path(dist, goal)
        self.goal = self.path[-1]
        self.goal_steps = 0
        self.progress_steps = 0
        self.blocked = 0
        self.walk_pitch = float(self.rng.choice([0.0, 0.0, 0.0, LOOK_STEP, -LOOK_STEP]))

    def _give_up(self) -> None:
        if self.goal_object is not None:
            self.skipped.add(self.goal_object.name)
        self.goal = None
        self.goal_object = None

    # -- walking ----------------------------------------------------------------------------
    def _walk(self) -> int | None:
        """The next command towards the goal, or None once it is reached (or given up)."""
        env, rng = self.env, self.rng
        x, y, yaw, pitch = env.pose
        here = np.array([x, y])
        self.goal_steps += 1
        self.progress_steps += 1
        stuck = self.progress_steps > PROGRESS_STEP_LIMIT or self.blocked > 4
        if stuck or self.goal_steps > GOAL_STEP_LIMIT:
            self._give_up()
            return None
        if np.linalg.norm(self.goal - here) < ARRIVE_DISTANCE:
            self._arrive()
            return None
        target = self._lookahead(here)
        offset = target - here
        err = wrap_angle(math.atan2(offset[1], offset[0]) - yaw)
        dist = float(np.linalg.norm(offset))
        r = rng.random()
        if abs(pitch - self.walk_pitch) > 1e-6 and r < 0.3:
            return LOOK_UP if self.walk_pitch > pitch else LOOK_DOWN
        if r > 0.985:
            return STAY
        side = STRAFE_LEFT if err > 0 else STRAFE_RIGHT
        if abs(err) <= HEADING_TOLERANCE:
            if not env.would_collide(FORWARD):
                return FORWARD
            return self._unblock(side)
        if abs(err) > math.radians(150) and dist < 0.6 and not env.would_collide(BACK):
            return BACK
        sideways = math.radians(60) < abs(err) < math.radians(120) and dist < 0.6
        small = abs(err) < math.radians(40) and r < 0.35
        if (sideways or small) and not env.would_collide(side):
            return side
        return TURN_LEFT if err > 0 else TURN_RIGHT

    def _lookahead(self, here: np.ndarray) -> np.ndarray:
        """The farthest path point within LOOKAHEAD in line of sight, else the one after the
        nearest. Points up to the nearest one (passed or beside the camera) are dropped."""
        dist = np.linalg.norm(np.array(self.path) - here, axis=-1)  # (n,)
        nearest = int(np.argmin(dist))
        if dist[nearest] < ARRIVE_DISTANCE or nearest > 0:
            del self.path[: min(nearest + 1, len(self.path) - 1)]
            self.progress_steps = 0
        points = np.array(self.path)  # (k, 2)
        near = np.linalg.norm(points - here, axis=-1) <= LOOKAHEAD
        count = int(np.argmin(near)) if not near.all() else len(points)
        if count == 0:
            return points[0]
        t = np.linspace(0.0, 1.0, int(LOOKAHEAD / 0.05) + 1)[None, :, None]  # (1, s, 1)
        samples = here + t * (points[:count, None, :] - here)  # (count, s, 2), <= 5 cm apart
        # near a wall the camera may stand closer than LOS_CLEARANCE: ask no more than it has
        need = min(LOS_CLEARANCE, max(COLLISION_MARGIN + 0.01, float(self.env.clearance(here))))
        clear = self.env.clearance(samples).min(axis=1) >= need  # (count,)
        return points[int(np.flatnonzero(clear)[-1])] if clear.any() else points[0]

    def _unblock(self, side: int) -> int:
        """Forward is blocked although planned: sidestep, else re-plan and turn."""
        self.blocked += 1
        other = STRAFE_RIGHT if side == STRAFE_LEFT else STRAFE_LEFT
        for command in (side, other):
            if not self.env.would_collide(command):
                return command
        dist = self._reachable()
        goal = self.grid.nearest_free(self.goal)
        if dist[goal] >= 0:
            self.path = self.grid.path(dist, goal)
        return TURN_LEFT if self.rng.random() < 0.5 else TURN_RIGHT

    def _arrive(self) -> None:
        """Script what to do at the goal, then clear it."""
        if self.goal_object is not None:
            self.queue.extend(self._inspect(self.goal_object))
            self.skipped.add(self.goal_object.name)
            self.visits_done += 1
        else:
            self.queue.extend(self._pause_at_spot())
        self.goal = None
        self.goal_object = None

    # -- scripts ----------------------------------------------------------------------------
    def _look_around(self) -> list[int]:
        """Turn about once around on the spot, with a nod and a pause or two."""
        rng = self.rng
        turn = TURN_LEFT if rng.random() < 0.5 else TURN_RIGHT
        script = [turn] * int(rng.integers(18, 27))
        k = int(rng.integers(1, 3))
        nod = [LOOK_UP] * k + [LOOK_DOWN] * k if rng.random() < 0.5 else [LOOK_DOWN] * k + [LOOK_UP] * k
        at = int(rng.integers(0, len(script)))
        script[at:at] = nod
        for _ in range(int(rng.integers(0, 3))):
            script.insert(int(rng.integers(0, len(script))), STAY)
        return script

    def _inspect(self, obj: RoomObject) -> list[int]:
        """Face the object, tilt towards its look point, pause, maybe back off a little."""
        rng = self.rng
        x, y, yaw, pitch = self.env.pose
        offset = obj.position - np.array([x, y])
        err = wrap_angle(math.atan2(offset[1], offset[0]) - yaw)
        turns = int(round(err / TURN_STEP))
        script = [TURN_LEFT if turns > 0 else TURN_RIGHT] * abs(turns)
        point = obj.look_points[0]
        horizontal = max(float(np.linalg.norm(point[:2] - [x, y])), 1e-6)
        want = float(np.clip(math.atan2(point[2] - EYE_HEIGHT, horizontal), -MAX_PITCH, MAX_PITCH))
        looks = int(round((want - pitch) / LOOK_STEP))
        script += [LOOK_UP if looks > 0 else LOOK_DOWN] * abs(looks)
        script += [STAY] * int(rng.integers(0, 3))
        if rng.random() < 0.4:
            script += [BACK] * int(rng.integers(1, 3))
        return script

    def _pause_at_spot(self) -> list[int]:
        """One of: a partial look-around, a strafe burst, a nod, a pause."""
        rng = self.rng
        choice = int(rng.integers(4))
        if choice == 0:
            return [TURN_LEFT if rng.random() < 0.5 else TURN_RIGHT] * int(rng.integers(3, 9))
        if choice == 1:
            return [STRAFE_LEFT if rng.random() < 0.5 else STRAFE_RIGHT] * int(rng.integers(2, 5))
        if choice == 2:
            k = int(rng.integers(1, 3))
            return [LOOK_UP] * k + [LOOK_DOWN] * k
        return [STAY] * int(rng.integers(1, 4))

    def _cover(self, here: np.ndarray) -> None:
        near = np.linalg.norm(self.grid.centres - here, axis=-1) <= COVER_RADIUS
        self.covered |= near
