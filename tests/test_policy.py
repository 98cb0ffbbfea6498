"""Policy heads: the goal head's contract, its samples, ``train stage=policy`` (exact resume, export) and
the agents that drive it in ``evaluate`` (bc, oracle_subgoal), on tiny recorded datasets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu_world.agents import OracleSubgoalAgent, expert_keyframes, load_policy
from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.data.policy_samples import PolicyEpisodes, SampleConfig
from emu_world.errors import UserError
from emu_world.evaluate import evaluate
from emu_world.record import record
from emu_world.train import run_stage
from policies.goal_head import GoalHeadConfig, GoalHeadPolicy
from policies.goal_head.modeling_goal_head import TemporalEnsembler

torch.set_num_threads(1)
TASK = "widowx_pick_place"


def env_config(task: str, *overrides: str) -> EnvConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="record", overrides=[f"env={task}", "env.image_size=32", *overrides])
    return to_dataclass(EnvConfig, cfg.env)


def record_unannotated(root: Path, episodes: int) -> None:
    """WidowX expert episodes written without subtask annotations (as a dataset brought from elsewhere)."""
    import envs
    from emu_world.data.recorder import DatasetRecorder, features_for_env
    from emu_world.episodes import run_episode

    class Unannotated:  # the expert without its subtask_index
        def __init__(self, expert):
            self.expert = expert

        def reset(self, obs, info):
            self.expert.reset(obs, info)

        def act(self, obs, info):
            return self.expert.act(obs, info)

    env = env_config(TASK, "env.max_episode_steps=12").make()
    agent = Unannotated(envs.make_expert(TASK, env))
    recorder = DatasetRecorder(root, "test/plain", fps=5.0, features=features_for_env(env, annotated=False),
                               robot_type="widowx")
    with recorder:
        for seed in range(episodes):
            def on_step(obs, action, next_obs, reward, terminated, truncated, info, subtask):
                recorder.add_frame(obs, action, task=env.unwrapped.task, reward=reward, done=terminated or truncated,
                                   success=bool(info["is_success"]))
            result, _ = run_episode(env, agent, seed, on_step=on_step)
            recorder.save_episode(seed=seed, success=result.success, steps=result.steps)
    env.close()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Three annotated 32x32 widowx episodes (the expert, at most 40 steps) and two without annotations."""
    tmp = tmp_path_factory.mktemp("policy_data")
    record(env_config(TASK, "env.max_episode_steps=40"), AgentConfig("scripted"), tmp / TASK, f"test/{TASK}",
           episodes=3, seed=0, keep_failures=True, progress=False)
    record_unannotated(tmp / "plain", 2)
    return {TASK: tmp / TASK, "plain": tmp / "plain"}


def train_cfg(dataset: Path, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "experiment=tiny_policy", f"dataset.root={dataset}", f"run_dir={run_dir}", *overrides])


def tiny_head(goal: str = "keyframe", **kw) -> GoalHeadPolicy:
    config = GoalHeadConfig(goal=goal, channels=[8, 8], strides=[2, 2], keypoints=4, hidden=16, **kw)
    config = config.resolved("front", 32, 7, 7, 5.0)
    stats = {"state_mean": np.zeros(7), "state_std": np.ones(7), "action_mean": np.ones(7), "action_std": 2 * np.ones(7)}
    torch.manual_seed(0)
    return GoalHeadPolicy(config, stats)


def head_batch(B: int = 3, chunk: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"observation.image": torch.rand(B, 3, 32, 32, generator=g),
            "observation.goal": torch.rand(B, 3, 32, 32, generator=g),
            "observation.state": torch.randn(B, 7, generator=g), "action": torch.randn(B, chunk, 7, generator=g),
            "action_is_pad": torch.zeros(B, chunk, dtype=torch.bool), "reached": torch.tensor([0.0, 1.0, 0.0])[:B]}


def test_config_resolves_rate_dependent_defaults():
    c = GoalHeadConfig().resolved("top", 128, 14, 14, 50.0)
    assert (c.chunk_size, c.n_action_steps, c.reached_margin, c.camera) == (20, 20, 3, "top")
    c = GoalHeadConfig(chunk_size=4, camera="front").resolved("top", 128, 7, 7, 5.0)
    assert (c.chunk_size, c.n_action_steps, c.reached_margin, c.camera) == (4, 4, 1, "front")
    with pytest.raises(ValueError, match="policy.goal"):
        GoalHeadConfig(goal="image")
    with pytest.raises(ValueError, match="exceeds policy.chunk_size"):
        GoalHeadConfig(chunk_size=4, n_action_steps=5)
    with pytest.raises(ValueError, match="resolved config"):
        GoalHeadPolicy(GoalHeadConfig())


def test_forward_masks_padding_and_does_not_mutate_the_batch(tmp_path):
    policy = tiny_head()
    batch = head_batch()
    before = {k: v.clone() for k, v in batch.items()}
    loss, logs = policy(batch)
    assert torch.isfinite(loss) and {"l1", "reached_bce", "reached_acc", "loss"} <= set(logs)
    assert all(torch.equal(before[k], batch[k]) for k in batch)
    # a padded step's action does not change the loss
    padded = {**batch, "action_is_pad": torch.tensor([[False, True]] * 3)}
    moved = {**padded, "action": padded["action"].clone()}
    moved["action"][:, 1] += 100.0
    assert policy(padded)[0].item() == pytest.approx(policy(moved)[0].item())
    # save / load round trip: the same chunk; the stats travel with the weights
    chunk = policy.predict_action_chunk(batch)
    assert chunk.shape == (3, 2, 7)
    policy.save(tmp_path / "head")
    again = GoalHeadPolicy.load(tmp_path / "head")
    assert torch.allclose(again.predict_action_chunk(batch), chunk)
    assert torch.equal(again.action_std, torch.full((7,), 2.0))
    bc = tiny_head(goal="none")
    assert bc.reached_head is None and bc.predict_action_chunk({k: v for k, v in batch.items()
                                                                 if k != "observation.goal"}).shape == (3, 2, 7)


def test_chunks_are_executed_then_requeried():
    policy = tiny_head(chunk_size=4, n_action_steps=3)
    batch = head_batch(B=1, chunk=4)
    policy.reset()
    actions = [policy.select_action(batch) for _ in range(7)]
    assert policy.queries == math.ceil(7 / 3)
    chunk = policy.predict_action_chunk(batch)
    assert torch.allclose(actions[0], chunk[:, 0]) and torch.allclose(actions[2], chunk[:, 2])
    assert torch.allclose(actions[3], chunk[:, 0])  # the next query starts a new chunk


def test_temporal_ensembler_averages_overlapping_chunks():
    m = 0.5
    ens = TemporalEnsembler(m, chunk_size=3)
    chunks = [torch.full((1, 3, 1), float(10 * i)) + torch.arange(3.0).reshape(1, 3, 1) for i in range(3)]
    out = [float(ens.update(c)) for c in chunks]
    w = np.exp(-m * np.arange(3))
    # step 2 averages chunk 0's third, chunk 1's second and chunk 2's first action, the oldest weighted most
    want2 = (w[0] * 2.0 + w[1] * 11.0 + w[2] * 20.0) / w.sum()
    assert out[0] == pytest.approx(0.0) and out[1] == pytest.approx((w[0] * 1 + w[1] * 10) / w[:2].sum())
    assert out[2] == pytest.approx(want2)


def test_samples_pair_each_frame_with_its_keyframe_and_pad_the_chunk(datasets):
    eps = PolicyEpisodes.load(datasets[TASK], None, [0, 1])
    assert eps.annotated and eps.camera == "observation.images.front"
    assert len(eps) == int(eps.episode_end[-1]) and eps.episode_end[0] < len(eps)  # two episodes end to end
    cfg = SampleConfig(chunk_size=3, goal=True, keyframe_jitter=0, shift=0, reached_margin=1, pad="mask")
    last = int(eps.episode_end[0]) - 1
    i = np.array([0, last - 1, last])
    assert not eps.batch(i, np.random.default_rng(0), SampleConfig(chunk_size=3))["action_is_pad"].any()  # repeat
    batch = eps.batch(i, np.random.default_rng(0), cfg)
    assert batch["observation.image"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["observation.goal"][2], batch["observation.image"][2])  # the last frame is its own
    assert batch["action_is_pad"].tolist() == [[False] * 3, [False, False, True], [False, True, True]]
    assert torch.equal(batch["action"][2, 1], batch["action"][2, 0])  # past the end: the last action again
    kf = eps.keyframe[i]
    assert batch["reached"].tolist() == [float(kf[0] - 0 <= 1), float(kf[1] - i[1] <= 1), 1.0]
    frames = np.arange(len(eps))
    jittered, past = eps.goal_indices(frames, np.random.default_rng(1), SampleConfig(keyframe_jitter=5))
    assert (jittered >= frames).all() and (jittered < eps.episode_end).all() and not past.any()
    # goals reached a moment ago: at most past_window steps back, inside the episode, reached, no action loss
    cfg = SampleConfig(chunk_size=3, keyframe_jitter=0, shift=0, reached_margin=1, past_prob=1.0, past_window=4)
    back, past = eps.goal_indices(frames, np.random.default_rng(2), cfg)
    assert past.all() and (back <= frames).all() and (frames - back <= 4).all()
    assert (back >= eps.episode_start(frames)).all() and eps.episode_start(frames)[-1] == eps.episode_end[0]
    batch = eps.batch(frames[:8], np.random.default_rng(2), cfg)
    assert batch["reached"].tolist() == [1.0] * 8 and batch["action_is_pad"].all()


def test_training_resumes_exactly_and_exports(datasets, tmp_path):
    full = run_stage(train_cfg(datasets[TASK], tmp_path / "full"))
    assert full.export_dir is not None and (full.export_dir / "model.safetensors").is_file()
    manifest = json.loads((full.export_dir / "manifest.json").read_text())
    assert manifest["stage"] == "policy" and manifest["data"]["episode_seeds"] == [0, 1, 2]
    assert manifest["head"]["chunk_size"] == 2 and manifest["head"]["fps"] == 5.0  # 0.4 s at 5 Hz
    assert "heldout_l1" in manifest["metrics"]
    run_stage(train_cfg(datasets[TASK], tmp_path / "part", "train.stop_after=4"))
    rest = run_stage(train_cfg(datasets[TASK], tmp_path / "part", "resume=true"))
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in full.history[4:]]
    a, b = GoalHeadPolicy.load(full.export_dir), GoalHeadPolicy.load(rest.export_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_goal_head_needs_annotations_and_a_policy_needs_one_dataset(datasets, tmp_path):
    with pytest.raises(UserError, match="policy.goal=none"):
        run_stage(train_cfg(datasets["plain"], tmp_path / "a"))
    bc = run_stage(train_cfg(datasets["plain"], tmp_path / "b", "policy.goal=none", "train.steps=2"))
    assert bc.export_dir is not None
    with pytest.raises(UserError, match="one task's dataset"):
        run_stage(train_cfg(datasets[TASK].parent, tmp_path / "c"))  # both datasets are in there


def test_agents_run_the_heads_and_refuse_the_wrong_robot(datasets, tmp_path):
    goal = run_stage(train_cfg(datasets[TASK], tmp_path / "goal")).export_dir
    bc = run_stage(train_cfg(datasets[TASK], tmp_path / "bc", "policy.goal=none")).export_dir
    env_cfg = env_config(TASK, "env.max_episode_steps=8")
    summary = evaluate(env_cfg, AgentConfig("oracle_subgoal", checkpoint=str(goal)), episodes=2, seed=5,
                       output_dir=tmp_path / "eval", progress=False)
    assert summary["episodes"] == 2 and summary["real_time_factor"] > 0 and summary["agent_seconds_per_step"] > 0
    records = [json.loads(x) for x in (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()]
    assert all(r["steps"] == 8 and r["annotations"][0]["start_step"] == 0 for r in records)
    summary = evaluate(env_cfg, AgentConfig("bc", checkpoint=str(bc)), episodes=1, seed=5,
                       output_dir=tmp_path / "eval_bc", progress=False)
    assert summary["episodes"] == 1
    with pytest.raises(UserError, match="goal-free head"):
        load_policy(AgentConfig("bc", checkpoint=str(goal)), env_cfg, want_goal=False)
    aloha = env_config("aloha_transfer_cube")
    with pytest.raises(UserError, match="14-D"):
        load_policy(AgentConfig("oracle_subgoal", checkpoint=str(goal)), aloha, want_goal=True)


def test_oracle_keyframes_are_the_experts_subtask_ends(tmp_path):
    env_cfg = env_config(TASK, "env.max_episode_steps=40")
    env = env_cfg.make()
    try:
        keyframes, steps = expert_keyframes(env, TASK, 3, "front")
    finally:
        env.close()
    assert len(keyframes) == len(steps) >= 2 and all(k.shape == (32, 32, 3) for k in keyframes)
    assert sum(steps) <= 40 and not np.array_equal(keyframes[0], keyframes[-1])
    policy = tiny_head()
    agent = OracleSubgoalAgent(policy, env_cfg, subtask_budget=1.0)
    agent.expert_steps = steps
    assert agent.budget(0) == steps[0] + 1


def test_an_agent_carries_nothing_from_one_episode_to_the_next(datasets, tmp_path):
    """Episode 2 of a two-episode evaluation is the same as that seed evaluated alone."""
    goal = run_stage(train_cfg(datasets[TASK], tmp_path / "goal")).export_dir
    env_cfg = env_config(TASK, "env.max_episode_steps=6")
    agent = AgentConfig("oracle_subgoal", checkpoint=str(goal))
    evaluate(env_cfg, agent, episodes=2, seed=7, output_dir=tmp_path / "two", progress=False)
    evaluate(env_cfg, agent, episodes=1, seed=8, output_dir=tmp_path / "one", progress=False)
    second = json.loads((tmp_path / "two" / "episodes.jsonl").read_text().splitlines()[1])
    alone = json.loads((tmp_path / "one" / "episodes.jsonl").read_text())
    keys = ("seed", "success", "steps", "max_subtask_progress", "annotations")
    assert {k: second[k] for k in keys} == {k: alone[k] for k in keys}
    assert second["agent"]["advances"] == alone["agent"]["advances"]


def tiny_act(path: Path, chunk: int = 4) -> Path:
    """A tiny untrained LeRobot ACT for the widowx task, saved as lerobot-train saves one."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    cfg = ACTConfig(input_features={"observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
                                    "observation.state": PolicyFeature(FeatureType.STATE, (7,))},
                    output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))}, chunk_size=chunk,
                    n_action_steps=chunk, dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1,
                    n_decoder_layers=1, latent_dim=8, n_vae_encoder_layers=1, pretrained_backbone_weights=None,
                    device="cpu")
    torch.manual_seed(0)
    stats = {"observation.images.front": {"mean": torch.zeros(3, 1, 1), "std": torch.ones(3, 1, 1)},
             "observation.state": {"mean": torch.zeros(7), "std": torch.ones(7)},
             "action": {"mean": torch.zeros(7), "std": torch.ones(7)}}
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    for part in (ACTPolicy(cfg), pre, post):
        part.save_pretrained(path)
    return path


def test_lerobots_act_runs_as_an_agent_with_its_own_processors(tmp_path):
    from policies.act import LeRobotACTAgent

    path = tiny_act(tmp_path / "pretrained_model")
    env_cfg = env_config(TASK, "env.max_episode_steps=5")
    for overrides in ({}, {"n_action_steps": 2}, {"temporal_ensemble_coeff": 0.01}):
        agent_cfg = AgentConfig("act", checkpoint=str(path), **overrides)
        summary = evaluate(env_cfg, agent_cfg, episodes=1, seed=1, output_dir=tmp_path / str(len(overrides)),
                           progress=False)
        assert summary["episodes"] == 1 and summary["agent_seconds_per_step"] > 0
    agent = LeRobotACTAgent.load(path, env_cfg, temporal_ensemble_coeff=0.01)
    assert agent.policy.config.n_action_steps == 1 and agent.policy.temporal_ensembler is not None
    with pytest.raises(UserError, match="1..4"):
        LeRobotACTAgent.load(path, env_cfg, n_action_steps=9)
    with pytest.raises(UserError, match="14"):
        LeRobotACTAgent.load(path, env_config("aloha_transfer_cube"))


def test_goals_can_be_keyframes_the_world_model_imagined(datasets, tiny_export, tmp_path):
    """policy_data.imagined_prob: the goal is the keyframe imagined from an earlier frame of the same subtask
    (cached before training, recorded in the manifest); the reached label keeps the true keyframe's time."""
    run = run_stage(train_cfg(datasets[TASK], tmp_path / "imag", "policy_data.imagined_prob=1.0",
                              f"policy_data.imagined_world_model={tiny_export['world_model']}",
                              "policy_data.imagined_every=1.0", "policy_data.imagined_decoding=ar", "train.steps=2"))
    manifest = json.loads((run.export_dir / "manifest.json").read_text())
    assert manifest["imagined_by"] == {"world_model": str(tiny_export["world_model"]), "decoding": "ar"}
    eps = PolicyEpisodes.load(datasets[TASK], None, [0])
    eps.imagined = {0: np.zeros((32, 32, 3), np.uint8), 6: np.full((32, 32, 3), 9, np.uint8)}
    cfg = SampleConfig(chunk_size=2, keyframe_jitter=3, shift=0, imagined_prob=1.0, reached_margin=1)
    i = np.array([0, 3, 7])
    batch = eps.batch(i, np.random.default_rng(0), cfg)
    same = [int(eps.subtask[6]) == int(eps.subtask[7]) and eps.keyframe[6] == eps.keyframe[7]]
    assert float(batch["observation.goal"][0].max()) == 0.0  # imagined from frame 0 itself
    if same[0]:
        assert torch.allclose(batch["observation.goal"][2], torch.full((3, 32, 32), 9 / 255))
    kf = eps.keyframe[i]
    assert batch["reached"][0] == float(kf[0] - 0 <= 1)  # the true keyframe's time, not the jittered one
