"""emu-world's robots as a LeRobot plugin: ``--robot.type=emu_world_aloha | emu_world_widowx | emu_world_sim``.

Importing this package registers the three robot configs with LeRobot (``RobotConfig.register_subclass``);
LeRobot builds a robot from its config by name (``EmuAlohaConfig`` -> :class:`EmuAloha`, found here).
LeRobot's CLIs import it by themselves when the plugin distribution ``lerobot_robot_emu_world`` is
installed (``register_third_party_plugins`` looks for installed distributions with that prefix), or with
``--robot.discover_packages_path=lerobot_robot_emu_world``.

Every robot filters every action through :class:`emu_world.safety.SafetyLayer` before any actuator
sees it (:mod:`lerobot_robot_emu_world.base`).
"""

from lerobot_robot_emu_world.config import EmuAlohaConfig, EmuSimConfig, EmuWidowXConfig
from lerobot_robot_emu_world.hardware import EmuAloha, EmuWidowX
from lerobot_robot_emu_world.sim import EmuSim

__all__ = ["EmuAloha", "EmuAlohaConfig", "EmuSim", "EmuSimConfig", "EmuWidowX", "EmuWidowXConfig"]
