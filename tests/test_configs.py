"""Every shipped YAML composes and validates against the code it describes (nothing is built)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError

import envs
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass

ENV_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "env").glob("*.yaml"))


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def test_every_task_has_an_env_config():
    assert ENV_CONFIGS == sorted(envs.TASKS)


@pytest.mark.parametrize("name", ENV_CONFIGS)
def test_env_config_matches_env(name):
    cfg = compose_eval(f"env={name}")
    env_cfg = to_dataclass(EnvConfig, cfg.env)  # __post_init__ checks shapes, cameras, fps
    assert env_cfg.max_episode_steps == envs.TASKS[name].max_episode_steps
    to_dataclass(AgentConfig, cfg.agent)


def test_typo_in_override_is_rejected():
    with pytest.raises(ConfigCompositionException, match="imagesize"):
        compose_eval("env.imagesize=64")
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="aloha_fodl"):
        compose_eval("env=aloha_fodl")


def test_wrong_values_are_rejected_with_the_fix():
    cfg = compose_eval("env=aloha_transfer_cube", "env.action_dim=7")
    with pytest.raises(ValueError, match="action_dim"):
        to_dataclass(EnvConfig, cfg.env)
    cfg = compose_eval("env=aloha_transfer_cube", "env.cameras=[nope]")
    with pytest.raises(ValueError, match="available"):
        to_dataclass(EnvConfig, cfg.env)
    cfg = compose_eval("agent.name=nope")
    with pytest.raises(ValueError, match="scripted"):
        to_dataclass(AgentConfig, cfg.agent)


def test_unknown_key_in_dataclass_conversion():
    cfg = compose_eval("env=aloha_transfer_cube", "+env.extra=1")
    with pytest.raises((ValueError, ConfigKeyError), match="extra"):
        to_dataclass(EnvConfig, cfg.env)
