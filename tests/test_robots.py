"""The robots of the hardware path: the Dynamixel ALOHA and WidowX against a fake serial port, the
simulator-backed robot through whole episodes, the rollout command's refusal without hardware, and the
LeRobot plugin's discovery.

The installed lerobot wheel ships no test doubles (its ``tests/mocks`` stay in its repository), so the fake
is ours, at the lowest level there is: ``serial.Serial`` as the Dynamixel SDK opens it. Everything above it
is real: the SDK's port and Protocol 2.0 packet handlers (CRC, byte stuffing, status packets), LeRobot's
``DynamixelMotorsBus``, our arms and robots. :class:`FakeServoChain` answers PING, READ, WRITE, SYNC_READ and
SYNC_WRITE like a chain of X-series servos: a control table per servo, EEPROM writes refused while torque is
on, Present_Position = position + Homing_Offset, and a servo with torque on reaches its goal at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from lerobot.cameras import CameraConfig
from lerobot.cameras.camera import Camera
from omegaconf import OmegaConf

import envs
import envs.aloha
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.errors import USER_ERROR_EXIT, UserError
from emu_world.hardware import make_robot_agent, run_on_robot

# -- a chain of Dynamixel X-series servos behind a fake serial port ------------------------------------------
TORQUE, GOAL, PRESENT, HOMING = 64, 116, 132, 20
SIGNED = {HOMING, GOAL, PRESENT}


class FakeServo:
    def __init__(self, motor_id: int, model_number: int, ticks: int = 2048):
        self.table = bytearray(256)
        self.table[0:2] = model_number.to_bytes(2, "little")
        self.table[7] = motor_id
        self.table[48:52] = (4095).to_bytes(4, "little")  # factory position limits: the whole turn
        self.position = ticks  # where the horn is (before the homing offset)

    def get(self, addr: int, n: int) -> int:
        return int.from_bytes(self.read(addr, n), "little", signed=addr in SIGNED)

    def read(self, addr: int, n: int) -> bytes:
        if addr == PRESENT:
            homing = int.from_bytes(self.table[HOMING:HOMING + 4], "little", signed=True)
            self.table[PRESENT:PRESENT + 4] = (self.position + homing).to_bytes(4, "little", signed=True)
        return bytes(self.table[addr:addr + n])

    def write(self, addr: int, data: bytes) -> int:
        """Apply a write; returns the status error (7: access error, EEPROM while torque is on)."""
        if addr < TORQUE and self.table[TORQUE]:
            return 7
        self.table[addr:addr + len(data)] = data
        if addr == GOAL and self.table[TORQUE]:
            self.position = self.get(GOAL, 4) - self.get(HOMING, 4)
        return 0


class FakeServoChain:
    """Servos on one bus; also the fake ``serial.Serial`` the SDK opens (``port_handler.setupPort``)."""

    def __init__(self, servos: dict[int, FakeServo]):
        from dynamixel_sdk.protocol2_packet_handler import Protocol2PacketHandler

        self.servos, self.ph = servos, Protocol2PacketHandler()
        self.rx, self.tx = bytearray(), bytearray()
        self.goal_writes: list[dict[int, int]] = []  # every SYNC_WRITE of Goal_Position: id -> ticks
        self.is_open = True

    # pyserial's surface, as dynamixel_sdk.PortHandler uses it
    def write(self, data) -> int:
        self.tx += bytes(data)
        self._handle()
        return len(data)

    def read(self, n: int) -> bytes:
        out, self.rx = bytes(self.rx[:n]), self.rx[n:]
        return out

    @property
    def in_waiting(self) -> int:
        return len(self.rx)

    def flush(self):
        pass

    def reset_input_buffer(self):
        self.rx.clear()

    def close(self):
        self.is_open = False

    # Protocol 2.0
    def _handle(self) -> None:
        while len(self.tx) >= 10:
            start = self.tx.find(b"\xff\xff\xfd\x00")
            if start < 0:
                self.tx.clear()
                return
            length = int.from_bytes(self.tx[start + 5:start + 7], "little")
            if len(self.tx) < start + 7 + length:
                return
            packet = list(self.tx[start:start + 7 + length])
            del self.tx[:start + 7 + length]
            assert self.ph.updateCRC(0, packet, len(packet) - 2) == packet[-2] | packet[-1] << 8, "bad CRC"
            packet = self.ph.removeStuffing(packet)
            n = int.from_bytes(bytes(packet[5:7]), "little")
            self._instruction(packet[4], packet[7], bytes(packet[8:8 + n - 3]))

    def _instruction(self, motor_id: int, inst: int, params: bytes) -> None:
        addr = int.from_bytes(params[0:2], "little")
        if inst == 0x01 and motor_id in self.servos:  # PING
            self._status(motor_id, 0, self.servos[motor_id].read(0, 2) + b"\x2d")
        elif inst == 0x02 and motor_id in self.servos:  # READ
            self._status(motor_id, 0, self.servos[motor_id].read(addr, int.from_bytes(params[2:4], "little")))
        elif inst == 0x03 and motor_id in self.servos:  # WRITE
            self._status(motor_id, self.servos[motor_id].write(addr, params[2:]), b"")
        elif inst == 0x82:  # SYNC_READ: one status packet per servo, in order
            n = int.from_bytes(params[2:4], "little")
            for i in params[4:]:
                if i in self.servos:
                    self._status(i, 0, self.servos[i].read(addr, n))
        elif inst == 0x83:  # SYNC_WRITE: no answer
            n, body, goals = int.from_bytes(params[2:4], "little"), params[4:], {}
            for k in range(0, len(body), n + 1):
                if body[k] in self.servos:
                    self.servos[body[k]].write(addr, body[k + 1:k + 1 + n])
                    goals[body[k]] = int.from_bytes(body[k + 1:k + 1 + n], "little", signed=True)
            if addr == GOAL:
                self.goal_writes.append(goals)

    def _status(self, motor_id: int, error: int, data: bytes) -> None:
        length = len(data) + 4
        packet = [0xFF, 0xFF, 0xFD, 0x00, motor_id, length & 0xFF, length >> 8, 0x55, error, *data, 0, 0]
        packet = self.ph.addStuffing(packet)
        total = int.from_bytes(bytes(packet[5:7]), "little") + 7
        crc = self.ph.updateCRC(0, packet, total - 2)
        packet[total - 2:total] = [crc & 0xFF, crc >> 8]
        self.rx += bytes(packet[:total])


@pytest.fixture
def fake_ports(monkeypatch, tmp_path):
    """``make(name, spec, joints)`` -> (port path, chain): a chain of servos for an arm spec at the given
    joint angles, reachable at a port path that exists (a file)."""
    import dynamixel_sdk.port_handler as port_handler
    from lerobot.motors.dynamixel.tables import MODEL_NUMBER_TABLE

    chains: dict[str, FakeServoChain] = {}
    monkeypatch.setattr(port_handler.serial, "Serial", lambda port, **kwargs: chains[port])

    def make(name: str, spec, joints: np.ndarray, gripper: float = 0.5, drop: tuple[int, ...] = ()):
        servos = {}
        for motor, (motor_id, model) in spec.motors().items():
            angle = spec.gripper.angle(gripper) if motor == "gripper" else \
                next((q for j, q in zip(spec.joints, joints) if j.name == motor.split("_shadow")[0]), 0.0)
            if motor_id not in drop:
                servos[motor_id] = FakeServo(motor_id, MODEL_NUMBER_TABLE[model], spec.to_ticks(angle))
        port = tmp_path / name
        port.touch()
        chains[str(port)] = FakeServoChain(servos)
        return str(port), chains[str(port)]

    return make


def robot_yaml(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((CONFIG_DIR / "robot" / f"{name}.yaml").read_text())
    data.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path



@CameraConfig.register_subclass("test_pattern")
@dataclass
class PatternCameraConfig(CameraConfig):
    """A camera showing a fixed pattern (tests only: no camera here). LeRobot finds :class:`PatternCamera`
    beside it by name, as it finds any third-party camera."""


class PatternCamera(Camera):
    def __init__(self, config: PatternCameraConfig):
        super().__init__(config)
        self.connected = False
        self.frame = np.indices((config.height, config.width)).sum(0, dtype=np.uint8)[..., None].repeat(3, -1)

    @property
    def is_connected(self) -> bool:
        return self.connected

    @staticmethod
    def find_cameras():
        return []

    def connect(self, warmup: bool = True) -> None:
        self.connected = True

    def read(self):
        return self.frame.copy()

    def async_read(self, timeout_ms: float = 0):
        return self.frame.copy()

    def read_latest(self, max_age_ms: int = 500):
        return self.frame.copy()

    def disconnect(self) -> None:
        self.connected = False


# -- configuration ----------------------------------------------------------------------------------------
def test_yaml_joint_limits_are_the_simulated_arms():
    """configs/robot/{aloha,widowx}.yaml list the same joints, order and limits as the tasks' MJCF."""
    from envs.aloha_transfer_cube import AlohaTransferCubeEnv
    from envs.widowx_pick_place import WidowXPickPlaceEnv
    from lerobot_robot_emu_world.config import EmuAlohaConfig, EmuWidowXConfig

    aloha = AlohaTransferCubeEnv(render_mode=None, observe_pixels=False)
    for arm in ("left", "right"):
        mjcf = np.array([aloha.model.joint(f"vx300s_{arm}/{j.name}").range
                         for j in EmuAlohaConfig().settings.arm.joints])
        spec = EmuAlohaConfig().settings.arm
        np.testing.assert_allclose(np.c_[spec.lower, spec.upper], mjcf, atol=1e-6)
    widowx = WidowXPickPlaceEnv(render_mode=None, observe_pixels=False)
    spec = EmuWidowXConfig().settings.arm
    mjcf = np.array([widowx.model.joint(j.name).range for j in spec.joints])
    np.testing.assert_allclose(np.c_[spec.lower, spec.upper], mjcf, atol=1e-6)


@pytest.mark.parametrize("change, needle", [
    ({"type": "widowx"}, "type must be 'aloha'"),
    ({"fps": 0}, "fps must be positive"),
    ({"safety": {"max_joint_step": -1}}, "max_joint_step"),
    ({"arm": {"joints": [], "gripper": {"id": 9, "model": "xm430-w350", "closed": 0, "opened": 1}}}, "arm.joints"),
    ({"extra": 1}, "unknown keys"),
])
def test_a_bad_robot_yaml_is_refused_by_name(tmp_path, change, needle):
    from lerobot_robot_emu_world.config import EmuAlohaConfig

    with pytest.raises(ValueError, match=needle):
        EmuAlohaConfig(config_file=str(robot_yaml(tmp_path, "aloha", **change)), calibration_dir=tmp_path)


# -- the Dynamixel robots on fake serial ports ------------------------------------------------------------
def aloha_robot(tmp_path, fake_ports, joints, **kwargs):
    from lerobot_robot_emu_world import EmuAloha, EmuAlohaConfig

    spec = EmuAlohaConfig().settings.arm
    left, left_chain = fake_ports("left", spec, joints[:6], joints[6], **kwargs)
    right, right_chain = fake_ports("right", spec, joints[7:13], joints[13])
    config = EmuAlohaConfig(config_file=str(robot_yaml(tmp_path, "aloha", cameras={})), port_left=left,
                            port_right=right, calibration_dir=tmp_path / "calibration")
    return EmuAloha(config), left_chain, right_chain


def test_aloha_calibrates_configures_reads_and_writes_through_the_safety_layer(tmp_path, fake_ports):
    from lerobot_robot_emu_world.base import RobotNotConnectedError

    pose = np.r_[envs.aloha.START_ARM_JOINTS, 0.5, envs.aloha.START_ARM_JOINTS, 0.5]
    robot, left, right = aloha_robot(tmp_path, fake_ports, pose)
    with pytest.raises(RobotNotConnectedError, match="lerobot-calibrate --robot.type=emu_world_aloha"):
        robot.connect(calibrate=False)  # factory-fresh servos: not our calibration
    assert not robot.is_connected
    robot.connect(calibrate=True)  # writes the YAML's calibration (EEPROM: torque off first), configures
    try:
        assert robot.is_calibrated and (tmp_path / "calibration" / "emu_world_aloha.json").is_file()
        servo = left.servos
        assert servo[1].get(11, 1) == 3 and servo[9].get(11, 1) == 5  # position mode; gripper current-based
        assert servo[3].get(12, 1) == 2 and servo[5].get(12, 1) == 4  # shadows follow shoulder and elbow
        assert servo[3].get(10, 1) == 1 and servo[2].get(10, 1) == 0  # shadows reversed
        assert servo[2].get(52, 4) == robot.settings.arm.to_ticks(-1.85005)  # shoulder's lower limit register
        assert all(s.get(TORQUE, 1) == 1 for s in servo.values())
        obs = robot.get_observation()
        np.testing.assert_allclose([obs[n] for n in robot.state_names], pose, atol=2e-3)  # ticks: 1.5e-3 rad
        sent = robot.send_action(dict(zip(robot.action_names, pose + 1.0)))  # every joint 1 rad away
        step = robot.settings.safety.max_joint_step
        np.testing.assert_allclose(np.array(list(sent.values()))[:6], pose[:6] + step, atol=2e-3)
        goals = left.goal_writes[-1]
        assert goals[2] == robot.settings.arm.to_ticks(pose[1] + step) and 3 not in goals  # shadows get nothing
        before = [dict(c.goal_writes[-1]) for c in (left, right)]
        robot.get_observation()
        robot.send_action(dict(zip(robot.action_names, np.full(14, np.nan))))  # held: the same goals again
        assert [c.goal_writes[-1] for c in (left, right)] == before
        assert robot.safety.counts["non_finite"] == 1 and robot.safety.counts["joint_step"] == 1
    finally:
        robot.disconnect()
    assert not robot.is_connected and servo[1].get(TORQUE, 1) == 1  # torque stays on: the arm does not fall


def test_a_silent_servo_is_refused_naming_the_port_setting(tmp_path, fake_ports):
    from lerobot_robot_emu_world.base import RobotNotConnectedError

    pose = np.r_[envs.aloha.START_ARM_JOINTS, 0.5, envs.aloha.START_ARM_JOINTS, 0.5]
    robot, _, _ = aloha_robot(tmp_path, fake_ports, pose, drop=(7,))
    with pytest.raises(RobotNotConnectedError, match=r"robot.port_left.*|Missing motor IDs") as e:
        robot.connect()
    assert "robot.port_left" in str(e.value) and not robot.is_connected


def test_widowx_turns_end_effector_deltas_into_joints_with_the_projects_ik(tmp_path, fake_ports):
    from lerobot_robot_emu_world import EmuWidowX, EmuWidowXConfig
    from lerobot_robot_emu_world.kinematics import WidowXKinematics

    spec = EmuWidowXConfig().settings.arm
    kin = WidowXKinematics()
    home, _ = kin.env.solve_ik(np.array([0.22, 0.0, 0.16]), np.eye(3), q_init=np.array([0, -0.3, 0.6, 0, 1.27, 0]),
                               iters=200)  # the task's home pose
    port, chain = fake_ports("widowx", spec, home, 1.0)
    robot = EmuWidowX(EmuWidowXConfig(config_file=str(robot_yaml(tmp_path, "widowx", cameras={})), port=port,
                                      calibration_dir=tmp_path))
    robot.connect(calibrate=True)
    try:
        state = np.array([robot.get_observation()[n] for n in robot.state_names])
        np.testing.assert_allclose(state[:3], kin.pose(home)[0], atol=3e-3)
        sent = robot.send_action(np.array([0.0, 0.0, 0.02, 0.0, 0.0, 0.0, 0.0]))  # 2 cm up, close
        after = np.array([robot.get_observation()[n] for n in robot.state_names])
        np.testing.assert_allclose(after[:3], state[:3] + [0, 0, 0.02], atol=3e-3)  # the fake servos track
        assert abs(sent["dz"] - 0.02) < 1e-3 and sent["gripper"] == 0.0
        assert len(chain.goal_writes) == 1 and set(chain.goal_writes[0]) == {1, 2, 4, 6, 7, 8, 9}
        robot.send_action(np.array([0.5, 0, 0, 0, 0, 0, 1.0]))  # beyond the 5 cm per-tick bound: clipped
        assert robot.safety.counts["action_bounds"] == 1
    finally:
        robot.disconnect()


# -- the simulated robot and the command ------------------------------------------------------------------
def compose_rollout(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="rollout", overrides=list(overrides))
    return to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), \
        OmegaConf.to_container(cfg.robot, resolve=True) if cfg.get("robot") is not None else None, cfg


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.mark.parametrize("task", ["aloha_transfer_cube", "widowx_pick_place"])
def test_the_sim_robot_runs_whole_episodes_through_the_hardware_path(task, tmp_path):
    env_cfg, agent_cfg, settings, cfg = compose_rollout(f"env={task}", "robot=sim", "agent=scripted", "dry_run=false",
                                                        "env.image_size=32")
    assert cfg.dry_run is False and settings["type"] == "sim"
    clock = Clock()
    summary = run_on_robot(env_cfg, agent_cfg, settings, episodes=1, seed=1000, dry_run=False, output_dir=tmp_path,
                           clock=clock, sleep=clock.sleep)
    assert summary["success_rate"] == 1.0 and summary["commands_sent"] == summary["mean_steps"] > 0
    assert summary["emergency_stop"] is None and summary["missed_deadlines"] == 0
    assert {"summary.json", "episodes.jsonl", "interventions.jsonl", "robot.yaml"} <= {p.name for p in tmp_path.iterdir()}
    assert clock.t >= summary["mean_steps"] / env_cfg.fps - 1e-6  # paced at the task's rate


def test_a_dry_run_prints_every_command_and_moves_nothing(tmp_path):
    env_cfg, agent_cfg, settings, cfg = compose_rollout("env=aloha_transfer_cube", "robot=sim", "agent=scripted",
                                                        "env.image_size=32", "env.max_episode_steps=15")
    assert cfg.dry_run is True  # the default
    lines, clock = [], Clock()
    summary = run_on_robot(env_cfg, agent_cfg, settings, episodes=1, seed=0, dry_run=True, output_dir=tmp_path,
                           echo=lines.append, clock=clock, sleep=clock.sleep)
    assert summary["commands_sent"] == 0 and summary["commands_planned"] == 15 and summary["success_rate"] is None
    assert len(lines) == 15 and all(line.startswith("dry run: episode 0 step") for line in lines)


def test_hardware_without_a_robot_is_refused_on_one_line():
    proc = subprocess.run([sys.executable, "-m", "emu_world.rollout", "env=aloha_transfer_cube", "robot=aloha",
                           "agent=scripted", "hydra.run.dir=" + os.devnull + "_unused"],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: robot=aloha") and "robot.port_left=<port>" in last


def test_scripted_experts_drive_the_simulator_only():
    env_cfg, agent_cfg, _, _ = compose_rollout("env=widowx_pick_place", "agent=scripted")
    with pytest.raises(UserError, match="robot=sim only"):
        make_robot_agent(object(), agent_cfg, env_cfg)


# -- the LeRobot plugin ------------------------------------------------------------------------------------
def test_lerobot_builds_our_robots_from_their_configs(tmp_path):
    from lerobot.configs.parser import load_plugin
    from lerobot.robots.config import RobotConfig
    from lerobot.robots.utils import make_robot_from_config

    load_plugin("lerobot_robot_emu_world")  # what --robot.discover_packages_path=lerobot_robot_emu_world does
    assert {"emu_world_aloha", "emu_world_widowx", "emu_world_sim"} <= set(RobotConfig.get_known_choices())
    config = RobotConfig.get_choice_class("emu_world_sim")(task="widowx_pick_place", image_size=32,
                                                           calibration_dir=tmp_path)
    robot = make_robot_from_config(config)
    assert type(robot).__name__ == "EmuSim" and robot.action_features.keys() == set(
        envs.task_spec("widowx_pick_place").env_cls().action_names)


def test_lerobot_discovers_the_installed_plugin():
    """``register_third_party_plugins`` (what lerobot-record runs first) imports installed distributions named
    lerobot_robot_*: the metadata-only one in lerobot_robot_emu_world/distribution."""
    import importlib.metadata

    if "lerobot_robot_emu_world" not in {d.metadata["Name"] for d in importlib.metadata.distributions()}:
        pytest.skip("pip install --no-build-isolation --no-deps ./lerobot_robot_emu_world/distribution")
    code = ("from lerobot.utils.import_utils import register_third_party_plugins as r; r(); "
            "from lerobot.robots.config import RobotConfig as C; print(sorted(C.get_known_choices()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/",
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(t in out.stdout for t in ("emu_world_aloha", "emu_world_widowx", "emu_world_sim")), out.stdout


class Wiggle:
    """A harmless agent: the measured pose with a small wiggle of every arm joint."""

    def reset(self, obs, info):
        self.t = 0

    def act(self, obs, info):
        self.t += 1
        a = np.array(obs["agent_pos"], dtype=np.float64)
        a[[0, 1, 2, 7, 8, 9]] += 0.01 * np.sin(self.t)
        assert obs["pixels"]["top"].shape == (32, 32, 3)  # the camera, squared and resized for the agent
        return a


def test_a_hardware_dry_run_moves_nothing_and_a_live_run_moves(tmp_path, fake_ports):
    from lerobot_robot_emu_world import EmuAloha, EmuAlohaConfig

    pose = np.r_[envs.aloha.START_ARM_JOINTS, 0.5, envs.aloha.START_ARM_JOINTS, 0.5]
    spec = EmuAlohaConfig().settings.arm
    (left, left_chain), (right, _) = fake_ports("left", spec, pose[:6], 0.5), fake_ports("right", spec, pose[7:13], 0.5)
    settings = yaml.safe_load((CONFIG_DIR / "robot" / "aloha.yaml").read_text())
    settings.update(port_left=left, port_right=right,
                    cameras={"top": {"type": "test_pattern", "width": 64, "height": 48, "fps": 30}})
    first = EmuAloha(EmuAlohaConfig(config_file=str(robot_yaml(tmp_path, "aloha", **settings)),
                                    calibration_dir=tmp_path))
    first.connect(calibrate=True)  # the servos now hold the calibration
    first.disconnect()
    env_cfg, agent_cfg, _, _ = compose_rollout("env=aloha_transfer_cube", "agent=scripted", "env.image_size=32",
                                               "env.max_episode_steps=10")
    for dry_run in (True, False):
        lines, clock = [], Clock()
        summary = run_on_robot(env_cfg, agent_cfg, settings, episodes=1, seed=0, dry_run=dry_run,
                               output_dir=tmp_path / str(dry_run), echo=lines.append, clock=clock, sleep=clock.sleep,
                               agent_factory=lambda robot: Wiggle())
        assert summary["robot"] == "aloha" and summary["success_rate"] is None  # hardware cannot tell
        if dry_run:
            assert left_chain.goal_writes == [] and summary["commands_planned"] == 10 and len(lines) == 10
        else:
            assert len(left_chain.goal_writes) == summary["commands_sent"] == 10 and lines == []
