"""LeRobot robot configs of emu-world's robots, and the robot YAML files they read.

Three ``--robot.type`` values (registered with ``RobotConfig.register_subclass``):

- ``emu_world_aloha``: the bimanual ALOHA, two ViperX 300 6DOF follower arms (``configs/robot/aloha.yaml``);
- ``emu_world_widowx``: a WidowX 250 6DOF driven by end-effector deltas (``configs/robot/widowx.yaml``);
- ``emu_world_sim``: either arm simulated by the project's MuJoCo tasks (``configs/robot/sim.yaml``).

Everything about the hardware (motor ids and models, joint limits, gripper angles, calibration, safety
limits, cameras) lives in the YAML file that ``config_file`` names (relative paths resolve against the
repository root), so the same file serves ``python -m emu_world.rollout robot=<name>`` (a Hydra config
group) and ``lerobot-record --robot.type=emu_world_<name>``. The few fields here override the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lerobot.cameras import CameraConfig
from lerobot.robots.config import RobotConfig

from emu_world.config import resolve_path
from emu_world.safety import SafetyConfig
from lerobot_robot_emu_world.spec import ArmSpec

ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The robot YAML at ``path`` (absolute, or relative to the repository root) as a dict."""
    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"robot config file {path} does not exist; pass config_file=<a configs/robot/*.yaml>")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def camera_configs(cameras: dict[str, dict[str, Any]] | None) -> dict[str, CameraConfig]:
    """LeRobot camera configs from the YAML's ``cameras:`` (``{name: {type: opencv, index_or_path: ...}}``)."""
    import lerobot.cameras.opencv  # noqa: F401  (registers type "opencv")

    out: dict[str, CameraConfig] = {}
    for name, settings in (cameras or {}).items():
        settings = dict(settings)
        kind = settings.pop("type", "opencv")
        if isinstance(settings.get("index_or_path"), str) and not settings["index_or_path"].isdigit():
            settings["index_or_path"] = Path(settings["index_or_path"])
        out[name] = CameraConfig.get_choice_class(kind)(**settings)
    return out


@dataclass
class HardwareSettings:
    """A hardware robot's YAML (``aloha.yaml``, ``widowx.yaml``), checked."""

    type: str
    fps: float
    ports: dict[str, str]  # arm name -> serial port
    arm: ArmSpec
    safety: SafetyConfig
    cameras: dict[str, dict[str, Any]] = field(default_factory=dict)
    disable_torque_on_disconnect: bool = False  # the Interbotix arms fall when their torque goes off

    @classmethod
    def from_dict(cls, data: dict[str, Any], kind: str, arms: tuple[str, ...]) -> HardwareSettings:
        data = dict(data)
        if data.get("type") != kind:
            raise ValueError(f"robot config: type must be {kind!r} for this robot, got {data.get('type')!r}")
        keys = {"port"} if arms == ("arm",) else {f"port_{a}" for a in arms}
        missing = sorted(keys - set(data))
        if missing:
            raise ValueError(f"robot config ({kind}): missing {missing}, the serial port of each arm")
        ports = {a: str(data.pop("port" if arms == ("arm",) else f"port_{a}")) for a in arms}
        settings = cls(type=data.pop("type"), fps=float(data.pop("fps")), ports=ports,
                       arm=ArmSpec.from_dict(data.pop("arm"), ARM_JOINTS), safety=SafetyConfig(**data.pop("safety")),
                       cameras=dict(data.pop("cameras", None) or {}),
                       disable_torque_on_disconnect=bool(data.pop("disable_torque_on_disconnect", False)))
        if data:
            raise ValueError(f"robot config ({kind}): unknown keys {sorted(data)}")
        if settings.fps <= 0:
            raise ValueError(f"robot config ({kind}): fps must be positive, got {settings.fps}")
        return settings


@RobotConfig.register_subclass("emu_world_aloha")
@dataclass
class EmuAlohaConfig(RobotConfig):
    """Bimanual ALOHA (two ViperX 300 6DOF followers): 14-D joint targets, the ``aloha_*`` tasks' order."""

    config_file: str = "configs/robot/aloha.yaml"
    port_left: str | None = None  # overrides the file's port_left
    port_right: str | None = None
    cameras: dict[str, CameraConfig] = field(default_factory=dict)  # replaces the file's cameras when given

    def __post_init__(self) -> None:
        data = read_yaml(self.config_file)
        for arm in ("left", "right"):
            if getattr(self, f"port_{arm}") is not None:
                data[f"port_{arm}"] = getattr(self, f"port_{arm}")
        self.settings = HardwareSettings.from_dict(data, "aloha", ("left", "right"))
        self.cameras = self.cameras or camera_configs(self.settings.cameras)
        self.id = self.id or "emu_world_aloha"
        super().__post_init__()


@RobotConfig.register_subclass("emu_world_widowx")
@dataclass
class EmuWidowXConfig(RobotConfig):
    """WidowX 250 6DOF: 7-D end-effector deltas + gripper (the ``widowx_*`` tasks), joints by the project's IK."""

    config_file: str = "configs/robot/widowx.yaml"
    port: str | None = None  # overrides the file's port
    cameras: dict[str, CameraConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = read_yaml(self.config_file)
        if self.port is not None:
            data["port"] = self.port
        self.settings = HardwareSettings.from_dict(data, "widowx", ("arm",))
        self.cameras = self.cameras or camera_configs(self.settings.cameras)
        self.id = self.id or "emu_world_widowx"
        super().__post_init__()


EMBODIMENTS = ("aloha", "widowx")


def embodiment(task: str) -> str:
    """Which arm a simulated task uses: ``aloha`` or ``widowx`` (from its name)."""
    kind = task.split("_")[0]
    if kind not in EMBODIMENTS:
        raise ValueError(f"robot=sim drives the arm tasks (aloha_*, widowx_*), not {task!r}")
    return kind


@RobotConfig.register_subclass("emu_world_sim")
@dataclass
class EmuSimConfig(RobotConfig):
    """Either arm simulated by the project's MuJoCo task ``task`` (``envs.make``), behind the same safety
    layer and interface as the hardware."""

    task: str = "aloha_transfer_cube"
    camera_names: list[str] = field(default_factory=list)  # rendered cameras (empty: the task's defaults)
    image_size: int = 128
    max_episode_steps: int | None = None  # None: the task's own limit
    config_file: str = "configs/robot/sim.yaml"

    def __post_init__(self) -> None:
        data = read_yaml(self.config_file)
        if data.get("type") != "sim":
            raise ValueError(f"{self.config_file}: type must be 'sim', got {data.get('type')!r}")
        kind = embodiment(self.task)
        if kind not in data:
            raise ValueError(f"{self.config_file}: no {kind}: section (the safety limits of the {kind} tasks)")
        self.safety = SafetyConfig(**data[kind]["safety"])
        self.realtime = bool(data.get("realtime", True))
        self.id = self.id or "emu_world_sim"
        super().__post_init__()
