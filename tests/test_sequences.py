"""World-model training data (emu_world.data.sequences): samples of each kind parse back into the
cached codes and binned actions, windows stay inside episodes, plans use the annotated keyframes,
held-out episodes stay out of training, the mixture follows its weights deterministically across
workers, and a packed batch trains a tiny world model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.data.robot_dataset import RobotDataset
from emu_world.data.sequences import (
    KINDS, DataConfig, HeldoutMetrics, MixtureDataset, collate, span_steps, window_frames,
)
from emu_world.data.tokenize import tokenize_dataset
from emu_world.models.layout import LayoutConfig, Role, SampleKind, SequenceLayout
from emu_world.record import record
from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer
from emu_world.models.world_model import WorldModel, WorldModelConfig
from envs.explore_room import ExploreRoomEnv

torch.set_num_threads(1)  # tiny tensors; the machine is shared

DYN, PLAN, EXPLORE = SampleKind.DYNAMICS, SampleKind.PLAN, SampleKind.EXPLORATION


def compose_cfg(config_name: str | None, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny recorded datasets (WidowX 5 Hz, explore_room 10 Hz; 2 episodes of 32x32 frames each),
    tokenized by an untrained tiny tokenizer into a cache outside the datasets."""
    tmp = tmp_path_factory.mktemp("seq")
    torch.manual_seed(0)
    tok = VisionTokenizer(to_dataclass(TokenizerConfig, compose_cfg("train", "tokenizer=tiny").tokenizer)).eval()
    roots = []
    for env, steps in (("widowx_pick_place", 40), ("explore_room", 24)):
        cfg = compose_cfg("record", f"env={env}", f"env.max_episode_steps={steps}", "env.image_size=32")
        root = tmp / env
        record(to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), root, f"test/{env}",
               episodes=2, seed=0, keep_failures=True, progress=False)
        tokenize_dataset(root, tok, cache_root=tmp / "cache", threads=1)
        roots.append(root)
    layout = SequenceLayout.from_config(to_dataclass(LayoutConfig, compose_cfg(None, "+layout=tiny").layout),
                                        tok.codebook_size, tok.grid)
    return tok, layout, roots, tmp / "cache"


def data_config(world, *overrides: str) -> DataConfig:
    _, _, roots, cache = world
    cfg = compose_cfg(None, "+seed=0", "+data=tiny", f"data.datasets=[{roots[0]},{roots[1]}]", f"data.token_cache={cache}",
                      *overrides)
    return to_dataclass(DataConfig, cfg.data)


@pytest.fixture(scope="module")
def mixture(world) -> MixtureDataset:
    tok, layout, _, _ = world
    return MixtureDataset(data_config(world), layout, tok.identity())


def draws(source, kind, split="train", n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [source.draw(kind, split, rng) for _ in range(n)]


def test_dynamics_samples_parse_back_into_codes_and_bins(world, mixture):
    _, layout, _, _ = world
    widowx = mixture.sources[0]
    assert widowx.embodiment == "widowx" and widowx.kind_probs.keys() == {DYN, PLAN} and widowx.frame_stride == 2
    k = layout.config.actions_per_frame
    for d in draws(widowx, DYN):
        ep = widowx.episodes[d.episode]
        p = layout.parse(d.sample.tokens)
        assert p.kind == DYN and p.prompt == "widowx: put the red block in the blue bowl"
        assert np.all(np.diff(d.frames) == 2) and 2 <= len(d.frames) <= 3
        assert d.frames[-1] <= ep.length - 1  # windows never cross the episode end
        np.testing.assert_array_equal(p.frames, ep.codes(d.camera, d.frames))
        assert p.action_bins.shape == (len(d.frames) - 1, k, 7)
        np.testing.assert_array_equal(d.steps, span_steps(d.frames, 2, k))
        np.testing.assert_array_equal(p.action_bins.reshape(-1, 7), widowx.binner.encode(ep.actions[d.steps]))
    # the binner comes from the dataset's lerobot statistics (q01/q99)
    assert widowx.binner.action_dim == 7 and widowx.binner.num_bins == layout.config.action_bins


def test_window_helpers():
    np.testing.assert_array_equal(window_frames(10, 3, 6, 2), [3, 5, 7, 9])  # cut at the episode end
    np.testing.assert_array_equal(span_steps(np.array([0, 10, 20]), 10, 2), [4, 9, 14, 19])
    with pytest.raises(ValueError, match="does not fit"):
        window_frames(10, 8, 3, 2)
    with pytest.raises(ValueError, match="multiple"):
        span_steps(np.array([0, 3]), 3, 2)


def test_plan_samples_use_the_annotated_keyframes(world, mixture):
    _, layout, _, _ = world
    widowx = mixture.sources[0]
    for d in draws(widowx, PLAN):
        ep = widowx.episodes[d.episode]
        p = layout.parse(d.sample.tokens)
        t = int(d.frames[0])
        i = next(j for j, s in enumerate(ep.subtasks) if s.start_frame <= t <= s.end_frame)
        todo = ep.subtasks[i:i + 2]  # max_plan_subtasks=2 in the tiny config
        assert p.kind == PLAN and p.texts == [s.text for s in todo]
        # keyframe of subtask j: the first frame of subtask j+1, the episode's last frame for the last one
        ends = [s.start_frame for s in ep.subtasks[1:]] + [ep.length - 1]
        np.testing.assert_array_equal(d.frames[1:], ends[i:i + len(todo)])
        assert t < d.frames[1] or i == len(ep.subtasks) - 1  # o_t comes before the keyframe it leads to
        np.testing.assert_array_equal(p.frames, ep.codes(d.camera, d.frames))


def test_exploration_samples_carry_the_commands(world, mixture):
    _, layout, _, _ = world
    explore = mixture.sources[1]
    assert explore.embodiment == "explore" and explore.kind_probs.keys() == {EXPLORE, PLAN} and explore.binner is None
    for d in draws(explore, EXPLORE):
        ep = explore.episodes[d.episode]
        p = layout.parse(d.sample.tokens)
        assert p.kind == EXPLORE and p.prompt == "explore: explore the room"
        np.testing.assert_array_equal(d.frames, d.frames[0] + np.arange(len(d.frames)))
        assert p.texts == [ExploreRoomEnv.commands[int(ep.actions[t, 0])] for t in d.steps]
        np.testing.assert_array_equal(p.frames, ep.codes(d.camera, d.frames))


def test_heldout_episodes_never_appear_in_training(world, mixture):
    tok, layout, _, _ = world
    for source in mixture.sources:  # 2 episodes, heldout_fraction 0.1 -> the last one held out
        assert [e.index for e in source.split_episodes["train"]] == [0]
        assert [e.index for e in source.split_episodes["heldout"]] == [1]
    rng = np.random.default_rng(1)
    assert {mixture.draw(rng).episode for _ in range(200)} == {0}
    heldout = MixtureDataset(data_config(world), layout, tok.identity(), split="heldout", num_batches=2)
    batches = list(heldout)
    assert len(batches) == 2 and {s.episode for b in batches for s in b.samples} == {1}


def test_mixture_follows_its_weights_and_is_deterministic(world):
    tok, layout, _, _ = world
    cfg = data_config(world, "data.kind_weights.plan=1.0", "data.kind_weights.exploration=3.0",
                      "data.datasets.0={root:" + str(world[2][0]) + ",weight:3.0}")
    mix = MixtureDataset(cfg, layout, tok.identity())
    expected = {("widowx_pick_place", DYN): 0.375, ("widowx_pick_place", PLAN): 0.375,
                ("explore_room", EXPLORE): 0.1875, ("explore_room", PLAN): 0.0625}
    assert mix.probabilities == pytest.approx(expected)
    rng = np.random.default_rng(0)
    drawn = [mix.draw(rng) for _ in range(800)]
    for key, p in expected.items():
        share = np.mean([(d.dataset, d.kind) == key for d in drawn])
        assert abs(share - p) < 0.05, (key, share, p)
    again = MixtureDataset(cfg, layout, tok.identity())
    for b in (0, 5):
        np.testing.assert_array_equal(mix.batch(b).packed.tokens, again.batch(b).packed.tokens)
    assert not np.array_equal(mix.batch(0).packed.tokens, mix.batch(1).packed.tokens)


def test_workers_yield_the_same_batches(world):
    tok, layout, _, _ = world
    mix = MixtureDataset(data_config(world), layout, tok.identity(), num_batches=4)
    loader = DataLoader(mix, batch_size=None, num_workers=2)  # token stores reopen in each worker
    got = [b.packed.tokens for b in loader]
    assert len(got) == 4
    for b, tokens in enumerate(got):
        np.testing.assert_array_equal(tokens, mix.batch(b).packed.tokens)


def test_packed_batch_keeps_images_whole_and_trains(world, mixture):
    _, layout, _, _ = world
    cfg = mixture.config
    batch = mixture.batch(0)
    p = batch.packed
    assert p.tokens.shape == (cfg.rows, cfg.max_len) and len(batch.samples) >= 2
    # every image of every sample lies whole inside one row, and every sample is one document
    assert len(p.image_spans) == sum(len(s.sample.image_spans) for s in batch.samples)
    for row, start, length, si, offset in p.documents:
        np.testing.assert_array_equal(p.tokens[row, start:start + length],
                                      batch.samples[si].sample.tokens[offset:offset + length])
    kinds = batch.token_kinds()
    assert set(np.unique(kinds[p.doc_ids >= 0])) <= set(range(len(KINDS))) and (kinds[p.doc_ids < 0] == -1).all()
    assert not batch.next_frame_mask()[p.roles != Role.VISION].any()  # only vision codes count as predicted frames

    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.preset("tiny"), layout)
    loss, logs = model(**model.packed_inputs(p))
    assert torch.isfinite(loss) and logs["tokens"] > 0
    loss.backward()
    metrics = HeldoutMetrics()
    with torch.no_grad():
        metrics.update(model.logits(torch.as_tensor(p.tokens), torch.as_tensor(p.doc_ids)), batch)
    result = metrics.result()
    assert result["loss"] == pytest.approx(logs["loss"], rel=1e-4)  # the training loss, split by kind
    for kind in {s.kind for s in batch.samples}:
        assert np.isfinite(result[f"loss/{kind.value}"]) and 0.0 <= result[f"frame_acc/{kind.value}"] <= 1.0

    with pytest.raises(ValueError, match="more than rows=1"):
        collate(layout, batch.samples, cfg.max_len, rows=1)


def test_unannotated_dataset_warns_and_draws_its_motion_kind(world, monkeypatch):
    tok, layout, _, _ = world
    monkeypatch.setattr(RobotDataset, "has_annotations", property(lambda self: False))
    with pytest.warns(UserWarning, match="no subtask annotations.*go to dynamics"):
        mix = MixtureDataset(data_config(world), layout, tok.identity())
    assert mix.probabilities == pytest.approx({("widowx_pick_place", DYN): 0.5, ("explore_room", EXPLORE): 0.5})


def test_config_and_dataset_errors_are_clear(world):
    tok, layout, roots, _ = world
    with pytest.raises(ValueError, match="unknown kind"):
        data_config(world, "+data.kind_weights.video=1.0")
    with pytest.raises(ValueError, match="twice"):
        DataConfig(datasets=[str(roots[0]), str(roots[0])])
    with pytest.raises(ValueError, match="not a multiple of layout.actions_per_frame=2"):
        MixtureDataset(data_config(world, "data.frame_stride.widowx=3"), layout, tok.identity())
    with pytest.raises(ValueError, match="yields nothing"):
        MixtureDataset(data_config(world, "data.kind_weights.dynamics=0", "data.kind_weights.plan=0"), layout,
                       tok.identity())
    with pytest.raises(ValueError, match="python -m emu_world.data.tokenize"):
        MixtureDataset(data_config(world), layout, "ibq-f8-k64-0000000000000000")  # never tokenized
    with pytest.raises(ValueError, match="frame_stride for embodiment 'robo'"):
        MixtureDataset(data_config(world, f"data.datasets=[{{root:{roots[0]},tag:robo}}]"), layout, tok.identity())


def test_cond_dropout_trains_on_unconditional_streams_only_in_training(world):
    tok, layout, _, _ = world
    mix = MixtureDataset(data_config(world, "data.cond_dropout=0.5"), layout, tok.identity())
    rng = np.random.default_rng(2)
    drawn = [mix.draw(rng) for _ in range(200)]

    def unconditional(sample) -> bool:  # no prompt text after BOS and the kind tag, no action bins
        return sample.tokens[2] == layout.sov and not any(t in layout.action for t in sample.tokens.tolist())

    dropped = [d for d in drawn if unconditional(d.sample)]
    assert 0.35 < len(dropped) / len(drawn) < 0.65  # about half: every conditional sample has a prompt
    for d in dropped[:5]:
        assert d.sample.tokens[1] in layout.kind_of_tag and not len(d.sample.text_spans)
        assert (d.sample.roles != Role.TEXT).all() and (d.sample.roles != Role.ACTION).all()
    batch = mix.batch(0)  # unconditional samples pack and keep their images whole
    assert len(batch.packed.image_spans) == sum(len(s.sample.image_spans) for s in batch.samples)
    heldout = MixtureDataset(data_config(world, "data.cond_dropout=0.5"), layout, tok.identity(), split="heldout")
    rng = np.random.default_rng(3)
    assert not any(unconditional(heldout.draw(rng).sample) for _ in range(50))
    with pytest.raises(ValueError, match="cond_dropout"):
        data_config(world, "data.cond_dropout=1.0")
