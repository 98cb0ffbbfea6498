"""``aloha_fold``: fold a square cloth in half with the bimanual ALOHA.

The scene is gym-aloha's two ViperX 300 arms (``vx300s_left.xml``, ``vx300s_right.xml``,
``vx300s_dependencies.xml`` and ``scene.xml``'s cameras and lights, included by absolute path
from :data:`envs.aloha.ALOHA_ASSETS`) plus a cloth lying on the table. Everything else in the
MJCF (actuators, table tiles, cloth, grasp constraints) is written by :func:`build_model_xml`.

Task: fold the cloth in half, bringing its *near* edge onto its *far* edge. "Near" is the edge
with the smaller world y, i.e. the side of the operator / ``angle`` camera (y = 0, in front of
the arm bases at y = 0.5); "far" is the edge toward the back of the table (+y). The cloth's
local grid is ``(ix, iy)`` with ``iy = 0`` the near edge and ``iy = n - 1`` the far edge; the
left arm (x < 0) folds the ``near_left`` corner onto ``far_left``, the right arm
``near_right`` onto ``far_right``.

Cloth (MuJoCo ``flexcomp type="grid" dim="2"``, mujoco 3.8): :data:`CLOTH_VERTS` x
:data:`CLOTH_VERTS` vertices over a :data:`CLOTH_SIZE` square, membrane/bending elasticity
from ``<elasticity young thickness>`` (the old shell plugin is gone, and edge equality cannot be
combined with ``young``). Each reset places it flat on the table with a random centre and yaw
drawn from ``self.np_random`` (:data:`CLOTH_CENTER_RANGE`, :data:`CLOTH_YAW_RANGE`).

Physics departures, all forced by MuJoCo's flex contacts (capped at 50 per flex-geom pair):

- The table is a 12 x 8 grid of invisible 10 cm box tiles, each in its own static body; the
  tabletop mesh is kept for looks only. A triangle lying on a box makes up to 3 contacts, so a
  tile fully under the cloth can still reach its 50 (smaller tiles do too, and cost more
  contacts); the neighbouring contacts hold the cloth up: no vertex sank in 50 episodes.
  (A ``plane`` geom would collide per vertex and without the cap, at twice the speed, but it
  would be infinite: the cloth could not fall off the table.)
- The cloth collides with the table tiles and (``selfcollide``) with itself, not with the
  robot. Grasping is a rule of the env's physics, applied in :meth:`AlohaFoldEnv._apply_action`
  once per control step: every (gripper, vertex) pair has a pre-declared, inactive ``connect``
  equality. When a gripper *closes* (its command is below :data:`RELEASE_COMMAND` and its
  fingers pass below :data:`CLOSED_OPENING` at this step, having been open at the previous one)
  and a cloth vertex lies within :data:`GRASP_RADIUS` of its pinch point (between the
  fingertips, :data:`PINCH_OFFSET` in the gripper_link frame), the nearest such vertex is
  attached where it is (the constraint's anchor is set to the vertex's current position in the
  gripper frame, so nothing jumps). It stays attached until the gripper command rises to
  :data:`RELEASE_COMMAND` or above. A gripper that closes away from the cloth grasps nothing,
  and a closed gripper moved onto the cloth does not pick it up.
- Timestep 4 ms (5 physics steps per 50 Hz control step), implicit-fast integrator and 50
  solver iterations, instead of gym-aloha's 2 ms Euler: both arms and the cloth stay stable
  (a 5x stiffer cloth does not) at > 50 control steps/s with one 128x128 camera on two cores.
- Cloth elasticity needs ``elastic2d="both"`` (stretching and bending); without it a 2-D flex
  has no elastic forces at all.

Success (:meth:`AlohaFoldEnv._evaluate`), from vertex geometry only: each near corner within
:data:`FOLD_TOLERANCE` (xy) of its far partner, every vertex over the table top and resting on
it (not sunk below the surface, none higher than :data:`ON_TABLE_MAX_Z`), and no gripper holding
the cloth. Progress stages: 1 both near corners lifted above :data:`LIFT_HEIGHT`; 2 both near
corners carried past the cloth's middle row (toward the far edge); 3 folded and released.

The scripted expert (:class:`AlohaFoldExpert`) moves each arm in joint space to a pose with
the gripper pointing down above its near corner, then tracks tool waypoints by IK: descend,
close, a half-circle around the fold line (radius half the near-far distance, so the lifted half
is not stretched) ending above the far corner, lower, release, retreat. It reads the cloth
through :meth:`AlohaFoldEnv.cloth_corners` only. Other code reads the cloth through
:meth:`AlohaFoldEnv.cloth_vertices` ((N, 3), grid order ``ix * n + iy``).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import mujoco
import numpy as np

from envs.aloha import (
    ALOHA_ASSETS,
    ARMS,
    START_GRIPPER,
    TOOL_OFFSET,
    AlohaEnv,
    BimanualWaypointExpert,
    Waypoint,
    interpolate,
)

# -- cloth --------------------------------------------------------------------------------------
CLOTH_VERTS = 11  # vertices per side (CLOTH_VERTS**2 in all)
CLOTH_SIZE = 0.24  # m, side of the square cloth
CLOTH_MASS = 0.1  # kg, whole cloth
CLOTH_RADIUS = 0.003  # m, collision radius (half thickness) of the flex
CLOTH_YOUNG = 1e4  # Pa (5e4 is unstable at the 4 ms timestep)
CLOTH_THICKNESS = 0.002  # m, elastic thickness (sets the bending stiffness)
CLOTH_GRID_ORIGIN = np.array([0.0, 0.5, CLOTH_RADIUS])  # the flexcomp's centre in the MJCF, m
CLOTH_CENTER_RANGE = np.array([[-0.04, 0.46], [0.04, 0.54]])  # (low, high) of the centre xy, m
CLOTH_YAW_RANGE = 0.35  # rad, yaw drawn from [-range, range]

# -- table: the tabletop mesh spans x in [-0.61, 0.61], y in [0.219, 0.981], top at z = 0 -----
TABLE_X = (-0.6, 0.6)
TABLE_Y = (0.22, 0.98)
TILE_COUNT = (12, 8)  # tiles along x, y: 0.1 x 0.095 m each
TILE_HALF_HEIGHT = 0.01  # m

# -- grasp rule ----------------------------------------------------------------------------------
PINCH_OFFSET = np.array([0.145, 0.0, 0.0])  # pinch point in the gripper_link frame (fingertips at 0.154)
GRASP_RADIUS = 0.02  # m, a vertex this close to the pinch point is caught when the gripper closes
CLOSED_OPENING = 0.35  # normalised finger opening below which the gripper counts as closed
RELEASE_COMMAND = 0.5  # normalised gripper command at or above which a grasp is released

# -- success ---------------------------------------------------------------------------------------
FOLD_TOLERANCE = 0.04  # m, xy distance of each near corner to its far partner
ON_TABLE_MAX_Z = 0.03  # m, highest vertex of a cloth lying (folded) on the table
SUNK_Z = -0.002  # m, a vertex centre below this has sunk into the table
LIFT_HEIGHT = 0.03  # m, near corners above this count as lifted

PHYSICS_TIMESTEP = 0.004  # s
SOLVER_ITERATIONS = 50

# gym-aloha's joint position servos (kp, force limit or None), per joint of one arm: facts read
# from its bimanual MJCF, written here as data.
ARM_SERVOS = {
    "waist": (800, 150), "shoulder": (1600, 300), "elbow": (800, 100),
    "forearm_roll": (10, 100), "wrist_angle": (50, None), "wrist_rotate": (20, None),
    "left_finger": (200, None), "right_finger": (200, None),
}


def _actuators_xml() -> str:
    lines = []
    for arm in ARMS:
        for joint, (kp, force) in ARM_SERVOS.items():
            limit = f' forcelimited="true" forcerange="-{force} {force}"' if force else ""
            lines.append(f'<position joint="vx300s_{arm}/{joint}" kp="{kp}" inheritrange="1"{limit}/>')
    return "\n    ".join(lines)


def _tiles_xml() -> str:
    nx, ny = TILE_COUNT
    hx = (TABLE_X[1] - TABLE_X[0]) / (2 * nx)
    hy = (TABLE_Y[1] - TABLE_Y[0]) / (2 * ny)
    lines = []
    for i in range(nx):
        for j in range(ny):
            x = TABLE_X[0] + (2 * i + 1) * hx
            y = TABLE_Y[0] + (2 * j + 1) * hy
            # group 3 is not rendered: the tabletop mesh shows the table
            lines.append(
                f'<body name="table_tile_{i}_{j}" pos="{x:.4f} {y:.4f} {-TILE_HALF_HEIGHT}">'
                f'<geom name="table_tile_{i}_{j}" type="box" size="{hx:.4f} {hy:.4f} {TILE_HALF_HEIGHT}" '
                f'group="3" contype="1" conaffinity="3"/></body>'
            )
    return "\n    ".join(lines)


def _grasp_equalities_xml() -> str:
    lines = []
    for arm in ARMS:
        for v in range(CLOTH_VERTS * CLOTH_VERTS):
            lines.append(f'<connect name="grasp_{arm}_{v}" body1="vx300s_{arm}/gripper_link" '
                         f'body2="cloth_{v}" anchor="0 0 0" active="false"/>')
    return "\n    ".join(lines)


def build_model_xml() -> str:
    """The task's MJCF: gym-aloha's arms and scene, table tiles, cloth, servos, grasp slots."""
    spacing = CLOTH_SIZE / (CLOTH_VERTS - 1)
    a = ALOHA_ASSETS
    # contype/conaffinity: robot 1/1, cloth 2/2, tiles 1/3 -> cloth touches only tiles (and itself)
    return f"""<mujoco model="aloha_fold">
  <compiler meshdir="{a}" angle="radian"/>
  <option timestep="{PHYSICS_TIMESTEP}" iterations="{SOLVER_ITERATIONS}" integrator="implicitfast"/>
  <include file="{a / 'scene.xml'}"/>
  <include file="{a / 'vx300s_dependencies.xml'}"/>
  <worldbody>
    <include file="{a / 'vx300s_left.xml'}"/>
    <include file="{a / 'vx300s_right.xml'}"/>
    {_tiles_xml()}
    <flexcomp name="cloth" type="grid" dim="2" count="{CLOTH_VERTS} {CLOTH_VERTS} 1"
              spacing="{spacing} {spacing} {spacing}" pos="{' '.join(map(str, CLOTH_GRID_ORIGIN))}"
              radius="{CLOTH_RADIUS}" mass="{CLOTH_MASS}" rgba="0.85 0.35 0.2 1">
      <contact condim="3" selfcollide="auto" contype="2" conaffinity="2" solref="0.01 1"/>
      <elasticity young="{CLOTH_YOUNG}" poisson="0.2" thickness="{CLOTH_THICKNESS}" damping="0.001" elastic2d="both"/>
      <edge damping="0.01"/>
    </flexcomp>
  </worldbody>
  <actuator>
    {_actuators_xml()}
  </actuator>
  <equality>
    {_grasp_equalities_xml()}
  </equality>
</mujoco>"""


def build_model() -> mujoco.MjModel:
    """Compile the task model; the tabletop mesh is made visual-only (the tiles collide)."""
    spec = mujoco.MjSpec.from_string(build_model_xml())
    table = spec.geom("table")
    table.contype = 0
    table.conaffinity = 0
    return spec.compile()


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class AlohaFoldEnv(AlohaEnv):
    """Bimanual ALOHA folding a cloth in half (near edge onto far edge), 14-D joint control."""

    task: ClassVar[str] = "fold the cloth in half, bringing the near edge onto the far edge"
    subtasks: ClassVar[tuple[str, ...]] = (
        "grasp the near corners of the cloth",
        "lift the near edge",
        "carry it over the far edge",
        "lay it down and release",
    )

    def __init__(self, render_mode: str | None = "rgb_array", cameras: Sequence[str] | None = None,
                 image_size=128, observe_pixels: bool = True):
        super().__init__(build_model(), render_mode=render_mode, cameras=cameras,
                         image_size=image_size, observe_pixels=observe_pixels)
        m = self.model
        n = CLOTH_VERTS
        flex = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_FLEX, "cloth")
        self._vert_adr = int(m.flex_vertadr[flex])
        self._vert_body = m.flex_vertbodyid[self._vert_adr: self._vert_adr + n * n].copy()  # (N,)
        # qpos addresses of each vertex body's three slide joints: (N, 3)
        self._vert_qpos_adr = np.array(
            [m.jnt_qposadr[m.body_jntadr[b]] + np.arange(3) for b in self._vert_body]
        )
        self._vert_dof_adr = np.array(
            [m.jnt_dofadr[m.body_jntadr[b]] + np.arange(3) for b in self._vert_body]
        )
        self._vert_rest = m.body_pos[self._vert_body].copy()  # (N, 3) positions at qpos = 0
        self._grasp_eq = {arm: np.array([m.equality(f"grasp_{arm}_{v}").id for v in range(n * n)])
                          for arm in ARMS}
        self._grasped: dict[str, int | None] = {arm: None for arm in ARMS}
        self._was_open: dict[str, bool] = {arm: False for arm in ARMS}
        # vertex index of each named corner: vertex (ix, iy) is ix * n + iy, iy = 0 the near edge
        self.corner_index = {"near_left": 0, "near_right": (n - 1) * n,
                             "far_left": n - 1, "far_right": n * n - 1}
        self.fold_partner = {"near_left": "far_left", "near_right": "far_right"}

    # -- episode ------------------------------------------------------------------------------
    def _randomize(self, rng: np.random.Generator, options: dict) -> None:
        mujoco.mj_resetData(self.model, self.data)  # also deactivates every grasp constraint
        self.reset_robot()
        center = rng.uniform(CLOTH_CENTER_RANGE[0], CLOTH_CENTER_RANGE[1])  # (2,) m
        yaw = float(rng.uniform(-CLOTH_YAW_RANGE, CLOTH_YAW_RANGE))
        self.place_cloth(center, yaw)
        self._grasped = {arm: None for arm in ARMS}
        self._was_open = {arm: False for arm in ARMS}

    def place_cloth(self, center: np.ndarray, yaw: float) -> None:
        """Lay the cloth flat on the table, centred at ``center`` (x, y) and turned by ``yaw`` (rad)."""
        local = self._vert_rest - CLOTH_GRID_ORIGIN  # (N, 3), flat grid around the origin
        world = local @ _yaw_matrix(yaw).T + np.array([center[0], center[1], CLOTH_RADIUS])
        self.set_cloth_vertices(world)

    def set_cloth_vertices(self, positions: np.ndarray) -> None:
        """Put the cloth vertices at ``positions`` (N, 3), at rest, and recompute derived quantities."""
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != self._vert_rest.shape:
            raise ValueError(f"cloth positions must have shape {self._vert_rest.shape}, got {positions.shape}")
        self.data.qpos[self._vert_qpos_adr] = positions - self._vert_rest  # slide joints: offsets from rest
        self.data.qvel[self._vert_dof_adr] = 0.0
        mujoco.mj_forward(self.model, self.data)

    # -- physics: actuation plus the grasp rule ---------------------------------------------------
    def _apply_action(self, action: np.ndarray) -> None:
        self._write_ctrl(action)
        self._update_grasps(action[[6, 13]])
        mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)

    def _update_grasps(self, gripper_command: np.ndarray) -> None:
        """Attach / release cloth vertices from the gripper commands (2,) and finger openings."""
        state = self._state()
        verts = self.cloth_vertices()
        for k, arm in enumerate(ARMS):
            command = float(gripper_command[k])
            is_open = bool(state[7 * k + 6] >= CLOSED_OPENING)
            held = self._grasped[arm]
            if held is not None and command >= RELEASE_COMMAND:
                self.data.eq_active[self._grasp_eq[arm][held]] = 0
                self._grasped[arm] = None
            elif held is None and command < RELEASE_COMMAND and self._was_open[arm] and not is_open:
                self._try_grasp(arm, verts)
            self._was_open[arm] = is_open

    def _try_grasp(self, arm: str, verts: np.ndarray) -> None:
        dist = np.linalg.norm(verts - self.pinch_point(arm), axis=1)
        v = int(np.argmin(dist))
        if dist[v] > GRASP_RADIUS:
            return
        eq = self._grasp_eq[arm][v]
        gripper = self._gripper_body[arm]
        # anchor in the gripper frame = the vertex where it is now; anchor on the vertex body = its origin
        self.model.eq_data[eq, 0:3] = self.data.xmat[gripper].reshape(3, 3).T @ (verts[v] - self.data.xpos[gripper])
        self.model.eq_data[eq, 3:6] = 0.0
        self.data.eq_active[eq] = 1
        self._grasped[arm] = v

    # -- public queries -------------------------------------------------------------------------
    def cloth_vertices(self) -> np.ndarray:
        """World positions of the cloth vertices, (N, 3) with N = CLOTH_VERTS**2, in grid order."""
        return self.data.flexvert_xpos[self._vert_adr: self._vert_adr + CLOTH_VERTS**2].copy()

    def cloth_corners(self) -> dict[str, np.ndarray]:
        """World positions (3,) of the four named corners (near_left, near_right, far_left, far_right)."""
        verts = self.cloth_vertices()
        return {name: verts[i] for name, i in self.corner_index.items()}

    def pinch_point(self, arm: str) -> np.ndarray:
        """World position (3,) of the point between the fingertips that grasps cloth."""
        pos, rot = self.ee_pose(arm)
        return pos + rot @ (PINCH_OFFSET - TOOL_OFFSET)

    def grasped_vertex(self, arm: str) -> int | None:
        """Index of the cloth vertex attached to ``arm``'s gripper, or None."""
        return self._grasped[arm]

    # -- task evaluation ------------------------------------------------------------------------
    def _evaluate(self) -> tuple[bool, int]:
        verts = self.cloth_vertices()
        corners = {name: verts[i] for name, i in self.corner_index.items()}
        near = [corners[c] for c in self.fold_partner]
        folded = all(np.linalg.norm(corners[n][:2] - corners[f][:2]) <= FOLD_TOLERANCE
                     for n, f in self.fold_partner.items())
        on_table = bool(
            np.all((verts[:, 0] > TABLE_X[0]) & (verts[:, 0] < TABLE_X[1])
                   & (verts[:, 1] > TABLE_Y[0]) & (verts[:, 1] < TABLE_Y[1]))
            and verts[:, 2].min() > SUNK_Z and verts[:, 2].max() < ON_TABLE_MAX_Z
        )
        released = all(self.grasped_vertex(arm) is None for arm in ARMS)
        if folded and on_table and released:
            return True, 3
        # fold axis: from the middle row's centre to the far edge's centre, in the xy plane
        n = CLOTH_VERTS
        grid = verts.reshape(n, n, 3)  # (ix, iy, xyz)
        middle = grid[:, n // 2, :2].mean(axis=0)
        axis = grid[:, n - 1, :2].mean(axis=0) - middle
        axis /= max(float(np.linalg.norm(axis)), 1e-9)
        if all(float((c[:2] - middle) @ axis) > 0.0 for c in near):
            return False, 2
        if all(c[2] > LIFT_HEIGHT for c in near):
            return False, 1
        return False, 0


class AlohaFoldExpert(BimanualWaypointExpert):
    """Each arm pinches its near corner, swings it over the fold line and lays it on the far corner."""

    env: AlohaFoldEnv

    # steps (50 Hz) of the plan's phases
    APPROACH = 50  # reach above the near corner, gripper opening
    DESCEND = 25  # lower the pinch point onto the corner
    CLOSE = 15  # command the gripper closed
    SQUEEZE = 10  # hold while the fingers close (the grasp rule catches the corner on the way)
    LIFT = 30  # the first LIFT_FRACTION of the half-circle
    CARRY = 75  # the rest of the half-circle, over the fold line
    LOWER = 20  # down onto the far corner
    RELEASE = 10  # open the gripper
    RETREAT = 30  # move up and away

    HOVER = 0.06  # m, pinch height above the corner before descending
    PINCH_HEIGHT = 0.008  # m, pinch point above the corner vertex when closing
    PLACE_HOVER = 0.04  # m, pinch point above the far corner at the end of the half-circle
    PLACE_HEIGHT = 0.012  # m, pinch point above the far corner when releasing
    ARC_SCALE = 1.1  # the half-circle's height relative to its radius
    LIFT_FRACTION = 0.3  # share of the half-circle travelled while "lifting"
    ARC_POINTS = 12  # waypoints along the half-circle
    RETREAT_HEIGHT = 0.08  # m, lift after releasing

    def _tool_target(self, pinch: np.ndarray, rot: np.ndarray) -> np.ndarray:
        """Tool centre point (3,) that puts the pinch point at ``pinch`` with gripper frame ``rot``."""
        return pinch - rot @ (PINCH_OFFSET - TOOL_OFFSET)

    def _down_rotation(self, arm: str, target: np.ndarray) -> np.ndarray:
        """Gripper frame (3, 3) pointing straight down at ``target``, its fingers closing across
        the line from the arm's base to the target (so the wrist need not turn)."""
        base, _ = self.env.body_pose(f"vx300s_{arm}")
        heading = target[:2] - base[:2]
        heading /= np.linalg.norm(heading)
        x_axis = np.array([0.0, 0.0, -1.0])
        y_axis = np.array([-heading[1], heading[0], 0.0])
        return np.column_stack([x_axis, y_axis, np.cross(x_axis, y_axis)])

    def _arc(self, near: np.ndarray, far: np.ndarray, s: float) -> np.ndarray:
        """Pinch point (3,) at fraction ``s`` of the half-circle from above ``near`` to above ``far``."""
        centre = 0.5 * (near + far)
        radius = 0.5 * float(np.linalg.norm((far - near)[:2]))
        angle = np.pi * s
        horizontal = centre[:2] + 0.5 * (near - far)[:2] * np.cos(angle)
        height = (1 - s) * (near[2] + self.PINCH_HEIGHT) + s * (far[2] + self.PLACE_HOVER)
        return np.r_[horizontal, height + self.ARC_SCALE * radius * np.sin(angle)]

    def _waypoint(self, arm: str, t: float, pinch: np.ndarray, gripper: float) -> Waypoint:
        """Waypoint at step ``t`` putting ``arm``'s pinch point at ``pinch`` (3,), gripper down."""
        rot = self._down_rotation(arm, pinch)
        return Waypoint(int(round(t)), self._tool_target(pinch, rot), rot, gripper)

    def reset(self, obs: dict, info: dict) -> None:
        super().reset(obs, info)
        # the approach runs in joint space, to the IK solution of the hover pose solved from the
        # start posture: tracking the rotation to "gripper down" step by step instead drifts into
        # the branch with the forearm rolled by pi
        self._approach: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for arm in ARMS:
            hover = self.waypoints[arm][1]
            q_hover, _ = self.env.solve_ik(arm, hover.pos, hover.rot, q_init=self._q[arm], iters=200)
            self._approach[arm] = (self._q[arm].copy(), q_hover)

    def act(self, obs: dict, info: dict) -> np.ndarray:
        if self.t >= self.APPROACH:
            return super().act(obs, info)
        frac = (self.t + 1) / self.APPROACH
        frac = frac * frac * (3 - 2 * frac)  # smoothstep: start and stop at rest
        parts = []
        for arm in ARMS:
            q_start, q_hover = self._approach[arm]
            q = (1 - frac) * q_start + frac * q_hover
            self._q[arm] = q
            _, _, gripper = interpolate(self.waypoints[arm], self.t)
            parts.append(np.r_[q, gripper])
        self.subtask_index = 0
        self.t += 1
        return np.concatenate(parts)

    def plan(self, obs: dict, info: dict) -> tuple[dict[str, list[Waypoint]], list[int]]:
        corners = self.env.cloth_corners()
        up = np.array([0.0, 0.0, 1.0])
        t_grasped = self.APPROACH + self.DESCEND + self.CLOSE + self.SQUEEZE
        t_lifted = t_grasped + self.LIFT
        t_carried = t_lifted + self.CARRY
        t_end = t_carried + self.LOWER + self.RELEASE + self.RETREAT
        waypoints: dict[str, list[Waypoint]] = {}
        for arm in ARMS:
            near, far = corners[f"near_{arm}"], corners[f"far_{arm}"]
            start_pos, start_rot = self.env.ee_pose(arm)
            wps = [Waypoint(0, start_pos, start_rot, START_GRIPPER)]
            t = self.APPROACH
            wps.append(self._waypoint(arm, t, near + self.HOVER * up, 1.0))
            t += self.DESCEND
            wps.append(self._waypoint(arm, t, near + self.PINCH_HEIGHT * up, 1.0))
            t += self.CLOSE
            wps.append(self._waypoint(arm, t, near + self.PINCH_HEIGHT * up, 0.0))
            wps.append(self._waypoint(arm, t_grasped, near + self.PINCH_HEIGHT * up, 0.0))
            # the half-circle: LIFT_FRACTION of it while lifting, the rest while carrying
            for s in np.linspace(0.0, 1.0, self.ARC_POINTS + 1)[1:]:
                if s <= self.LIFT_FRACTION:
                    t = t_grasped + self.LIFT * s / self.LIFT_FRACTION
                else:
                    t = t_lifted + self.CARRY * (s - self.LIFT_FRACTION) / (1 - self.LIFT_FRACTION)
                wps.append(self._waypoint(arm, t, self._arc(near, far, s), 0.0))
            place = far + self.PLACE_HEIGHT * up
            t = t_carried + self.LOWER
            wps.append(self._waypoint(arm, t, place, 0.0))
            t += self.RELEASE
            wps.append(self._waypoint(arm, t, place, 1.0))
            wps.append(self._waypoint(arm, t_end, place + self.RETREAT_HEIGHT * up, 1.0))
            waypoints[arm] = wps
        return waypoints, [t_grasped, t_lifted, t_carried, t_end]
