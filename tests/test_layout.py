"""The sequence layout: vocabulary ranges, action binning, build -> tokens -> parse round trips,
loss weights, malformed streams, the generation grammar and packing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu_world.config import CONFIG_DIR, to_dataclass
from emu_world.models.layout import (
    HINT_ACTIONS, HINT_CELL, HINT_CODE, SPECIAL_TOKENS, ActionBinner, LayoutConfig, LayoutError, Role, SampleKind,
    SequenceLayout,
)
from emu_world.models.text_tokenizer import load_text_tokenizer

GRID = (2, 3)  # not square: catches h/w mix-ups
K = 8
A = 3  # action dimensions
TASK = "put the red block in the blue bowl"


def layout_config(name: str) -> LayoutConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+layout={name}"])
    return to_dataclass(LayoutConfig, cfg.layout)


@pytest.fixture(scope="module")
def text():
    return load_text_tokenizer()


@pytest.fixture(scope="module")
def layout(text):
    return SequenceLayout(layout_config("tiny"), text, K, GRID)  # 16 bins, k=2 actions per frame


def codes(rng, n):
    return rng.integers(0, K, (n, *GRID))


def dynamics_sample(layout, rng, n=3, trailing_action=True, end=True):
    k = layout.config.actions_per_frame
    m = n * k if trailing_action else (n - 1) * k
    frames, bins = codes(rng, n), rng.integers(0, layout.config.action_bins, (m, A))
    return layout.dynamics(TASK, frames, bins, end=end), frames, bins


# ----------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_shipped_configs_validate(name):
    cfg = layout_config(name)
    assert cfg.vision_weight == 0.5


def test_vocabulary_ranges_are_contiguous_and_sized(text):
    layout = SequenceLayout(layout_config("default"), text, 1024, (16, 16))
    assert layout.text.start == 0 and layout.text.stop == text.vocab_size
    assert layout.specials.start == layout.text.stop and len(layout.specials) == len(SPECIAL_TOKENS)
    assert layout.vision.start == layout.specials.stop and len(layout.vision) == 1024
    assert layout.action.start == layout.vision.stop and len(layout.action) == 256
    assert layout.vocab_size % 64 == 0 and layout.action.stop <= layout.vocab_size < layout.action.stop + 64
    assert len(set(layout.special.values())) == len(SPECIAL_TOKENS)
    assert layout.token_name(layout.eol) == "[EOL]"
    assert layout.token_name(layout.vision.start + 5) == "vision code 5"
    assert layout.token_name(layout.action.start + 7) == "action bin 7"
    assert "outside the vocabulary" in layout.token_name(layout.vocab_size)
    assert "unused" in layout.token_name(layout.action.stop)
    assert layout.parse(layout.plan(TASK, np.zeros((16, 16), int), [], []).tokens).frames.shape == (1, 16, 16)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="action_range"):
        LayoutConfig(action_range="iqr")
    with pytest.raises(ValueError, match="action_bins"):
        LayoutConfig(action_bins=1)
    with pytest.raises(ValueError, match="vision_weight"):
        LayoutConfig(vision_weight=-1.0)
    with pytest.raises(ValueError, match="all loss weights are 0"):
        LayoutConfig(text_weight=0, vision_weight=0, action_weight=0, structure_weight=0)
    with pytest.raises(ValueError, match="actions_per_frame"):
        LayoutConfig(actions_per_frame=0)


# ----------------------------------------------------------------------------- actions


def test_action_binner_round_trip_within_half_a_bin(tmp_path):
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(500, A)) * np.array([1.0, 0.1, 5.0])
    binner = ActionBinner.fit(actions, num_bins=32, quantile=0.0)
    bins = binner.encode(actions)
    assert bins.dtype == np.int64 and bins.shape == actions.shape
    assert bins.min() == 0 and bins.max() == 31
    err = np.abs(binner.decode(bins) - actions)
    assert (err <= (binner.high - binner.low) / 64 + 1e-5).all()
    binner.save(tmp_path / "binner.json")
    again = ActionBinner.load(tmp_path / "binner.json")
    np.testing.assert_array_equal(again.encode(actions), bins)


def test_action_binner_clips_and_handles_constant_dimensions():
    binner = ActionBinner(low=[-1.0, 2.0], high=[1.0, 2.0], num_bins=4)
    bins = binner.encode(np.array([[-5.0, 2.0], [5.0, 9.0], [0.0, 2.0]]))
    np.testing.assert_array_equal(bins[:, 0], [0, 3, 2])
    np.testing.assert_allclose(binner.decode(bins)[:, 1], 2.0)
    np.testing.assert_allclose(binner.decode(np.array([[0, 0], [3, 0]]))[:, 0], [-0.75, 0.75])


def test_action_binner_from_lerobot_stats_and_errors(layout, tmp_path):
    stats = {"min": [-2.0, 0.0, 0.0], "max": [2.0, 1.0, 1.0], "q01": [-1.0, 0.1, 0.0], "q99": [1.0, 0.9, 1.0]}
    binner = layout.binner_from_stats(stats)
    assert binner.num_bins == 16 and binner.action_dim == 3
    np.testing.assert_allclose(binner.low, [-1.0, 0.1, 0.0])
    np.testing.assert_allclose(ActionBinner.from_stats(stats, method="minmax").low, [-2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="q01"):
        ActionBinner.from_stats({"min": [0.0], "max": [1.0]})
    with pytest.raises(ValueError, match="high < low"):
        ActionBinner(low=[1.0], high=[0.0])
    with pytest.raises(ValueError, match="3 dimensions"):
        binner.encode(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        binner.encode(np.full((1, 3), np.nan))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        binner.decode(np.full((1, 3), 16))
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not an action binner"):
        ActionBinner.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("trailing_action", [True, False])
def test_dynamics_round_trip(layout, trailing_action):
    rng = np.random.default_rng(1)
    s, frames, bins = dynamics_sample(layout, rng, trailing_action=trailing_action)
    assert s.kind == SampleKind.DYNAMICS and s.tokens.dtype == np.int64
    p = layout.parse(s.tokens)
    assert p.kind == SampleKind.DYNAMICS and p.prompt == TASK and p.texts == [] and p.complete
    np.testing.assert_array_equal(p.frames, frames)
    k = layout.config.actions_per_frame
    assert p.action_bins.shape == (len(bins) // k, k, A)
    np.testing.assert_array_equal(p.action_bins.reshape(-1, A), bins)
    binner = ActionBinner(np.zeros(A), np.ones(A), num_bins=layout.config.action_bins)
    np.testing.assert_allclose(p.actions(binner), binner.decode(bins))


def test_plan_round_trip(layout):
    rng = np.random.default_rng(2)
    obs, keys = codes(rng, 1)[0], codes(rng, 2)
    subtasks = ["reach the red block", "lower the block into the bowl and release it"]
    s = layout.plan(TASK, obs, subtasks, keys)
    p = layout.parse(s.tokens)
    assert p.kind == SampleKind.PLAN and p.prompt == TASK and p.texts == subtasks
    np.testing.assert_array_equal(p.frames, np.concatenate([obs[None], keys]))
    assert p.action_bins.shape[0] == 0


def test_exploration_round_trip(layout):
    rng = np.random.default_rng(3)
    frames, commands = codes(rng, 4), ["forward", "turn left", "look up"]
    s = layout.exploration("explore the room", frames, commands)
    p = layout.parse(s.tokens)
    assert p.kind == SampleKind.EXPLORATION and p.prompt == "explore the room" and p.texts == commands
    np.testing.assert_array_equal(p.frames, frames)
    # text the BPE never saw still round-trips (byte fallback)
    s = layout.exploration("a new scène", frames[:2], ["jump 🙂"])
    assert layout.parse(s.tokens).texts == ["jump 🙂"]


def test_spans_point_at_the_right_tokens(layout):
    rng = np.random.default_rng(4)
    s, frames, bins = dynamics_sample(layout, rng)
    h, w = GRID
    assert s.image_spans.shape == (3, 2) and s.action_spans.shape == (3, 2)
    for (a, b), frame in zip(s.image_spans, frames):
        assert b - a == layout.image_span_len and s.tokens[b] == layout.eov and s.tokens[a - 1] == layout.sot
        block = s.tokens[a:b].reshape(h, w + 1)  # (h, w+1): codes then EOL
        np.testing.assert_array_equal(block[:, :w] - layout.vision.start, frame)
        assert (block[:, w] == layout.eol).all()
        np.testing.assert_array_equal(s.tokens[a + layout.code_offsets] - layout.vision.start, frame.reshape(-1))
    k = layout.config.actions_per_frame
    for i, (a, b) in enumerate(s.action_spans):
        assert s.tokens[a - 1] == layout.boa and s.tokens[b] == layout.eoa
        np.testing.assert_array_equal(s.tokens[a:b] - layout.action.start, bins[i * k:(i + 1) * k].reshape(-1))
    (a, b), = s.text_spans
    assert layout.text_tokenizer.decode(s.tokens[a:b]) == TASK
    assert s.tokens[0] == layout.bos and s.tokens[1] == layout.kind_tag[SampleKind.DYNAMICS]
    assert s.tokens[-1] == layout.eos


def test_builders_reject_bad_inputs(layout):
    rng = np.random.default_rng(5)
    with pytest.raises(LayoutError, match=r"\(n, 2, 3\)"):
        layout.dynamics(TASK, rng.integers(0, K, (2, 3, 2)), rng.integers(0, 16, (4, A)))
    with pytest.raises(LayoutError, match=r"\[0, 8\)"):
        layout.dynamics(TASK, np.full((2, *GRID), K), rng.integers(0, 16, (4, A)))
    with pytest.raises(LayoutError, match="m = n\\*k"):
        layout.dynamics(TASK, codes(rng, 2), rng.integers(0, 16, (3, A)))
    with pytest.raises(LayoutError, match="ActionBinner.encode"):
        layout.dynamics(TASK, codes(rng, 2), np.full((4, A), 0.5))
    with pytest.raises(LayoutError, match="2 text segments"):
        layout.exploration("explore the room", codes(rng, 3), ["forward"])
    with pytest.raises(LayoutError, match="non-empty"):
        layout.plan("", codes(rng, 1)[0], [], [])
    with pytest.raises(LayoutError, match="max_text_tokens"):
        layout.plan("word " * 40, codes(rng, 1)[0], [], [])


# ----------------------------------------------------------------------------- loss weights


def test_loss_weights_follow_roles(layout):
    rng = np.random.default_rng(6)
    s, _, _ = dynamics_sample(layout, rng)
    r = s.roles
    assert s.weights.dtype == np.float32 and s.weights.shape == s.tokens.shape
    assert s.weights[0] == 0.0  # BOS is never a target
    np.testing.assert_array_equal(s.weights[r == Role.VISION], 0.5)
    np.testing.assert_array_equal(s.weights[r == Role.ACTION], 1.0)
    np.testing.assert_array_equal(s.weights[r == Role.PROMPT], 0.0)  # the task is a condition by default
    np.testing.assert_array_equal(s.weights[r == Role.STRUCTURE], 1.0)
    assert (r[s.tokens == layout.eol] == Role.STRUCTURE).all()
    vision = s.tokens[r == Role.VISION]
    assert ((vision >= layout.vision.start) & (vision < layout.vision.stop)).all()
    assert (r == Role.VISION).sum() == 3 * GRID[0] * GRID[1]

    plan = layout.plan(TASK, codes(rng, 1)[0], ["lift the cube"], codes(rng, 1))
    assert (plan.weights[plan.roles == Role.TEXT] == 1.0).all() and (plan.roles == Role.TEXT).any()

    cfg = replace(layout.config, train_prompt=True, vision_weight=0.25, text_weight=2.0)
    trained = SequenceLayout(cfg, layout.text_tokenizer, K, GRID).dynamics(TASK, codes(rng, 1), np.zeros((2, A), int))
    assert trained.weights[0] == 0.0
    np.testing.assert_array_equal(trained.weights[1:][trained.roles[1:] == Role.PROMPT], 2.0)
    np.testing.assert_array_equal(trained.weights[trained.roles == Role.VISION], 0.25)


# ----------------------------------------------------------------------------- malformed streams


def test_malformed_streams_are_rejected_clearly(layout):
    rng = np.random.default_rng(7)
    s, _, _ = dynamics_sample(layout, rng)
    t = s.tokens
    (a, b) = s.image_spans[0]
    w = GRID[1]

    def broken(fn):
        x = t.copy().tolist()
        fn(x)
        return x

    # a row with one code too many: EOL was due
    with pytest.raises(LayoutError, match=r"expected EOL, got vision code .*row 1 of 2, after 3 of 3 codes"):
        layout.parse(broken(lambda x: x.insert(a + w, layout.vision.start)))
    # missing EOL: the next row's code comes where EOL belongs; a short row: EOL too early
    with pytest.raises(LayoutError, match="expected EOL"):
        layout.parse(broken(lambda x: x.pop(a + w)))
    with pytest.raises(LayoutError, match=r"expected vision, got \[EOL\].*after 2 of 3 codes"):
        layout.parse(broken(lambda x: x.pop(a + w - 1)))
    # code id out of range / not a code
    with pytest.raises(LayoutError, match="outside the vocabulary"):
        layout.parse(broken(lambda x: x.__setitem__(a, layout.vocab_size + 3)))
    with pytest.raises(LayoutError, match="expected vision, got action bin"):
        layout.parse(broken(lambda x: x.__setitem__(a, layout.action.start)))
    # EOF is reserved, never written
    with pytest.raises(LayoutError, match=r"got \[EOF\]"):
        layout.parse(broken(lambda x: x.__setitem__(b, layout.special["EOF"])))
    # unterminated image / action span, missing EOS
    with pytest.raises(LayoutError, match="unterminated.*image 1, row 2"):
        layout.parse(t[: a + w + 2])
    a0, b0 = s.action_spans[0]
    with pytest.raises(LayoutError, match="unterminated.*action span 1"):
        layout.parse(t[: a0 + 2])
    with pytest.raises(LayoutError, match="without EOS"):
        layout.parse(t[:-1])
    # action spans must all have the same length; and the meta must match the grid
    a1, _ = s.action_spans[1]
    with pytest.raises(LayoutError, match="expected EOA"):
        layout.parse(broken(lambda x: x.insert(a1, layout.action.start)))
    meta_start = a - 1 - len(layout.meta_ids)  # SOV meta SOT codes
    nine = layout.text_tokenizer.encode("9")[0]
    with pytest.raises(LayoutError, match="meta token 0 of '2\\*3'"):
        layout.parse(broken(lambda x: x.__setitem__(meta_start, nine)))
    # dynamics streams carry actions, not text, after a frame; PAD only after EOS
    with pytest.raises(LayoutError, match="expected BOA\\|EOS, got text token"):
        layout.parse(broken(lambda x: x.__setitem__(b + 1, layout.text_tokenizer.encode("go")[0])))
    with pytest.raises(LayoutError, match=r"got \[PAD\]"):
        layout.parse(broken(lambda x: x.insert(3, layout.pad)))
    assert layout.parse(t.tolist() + [layout.pad] * 4).complete
    with pytest.raises(LayoutError, match="empty"):
        layout.parse([])
    with pytest.raises(LayoutError, match="expected BOS"):
        layout.parse(t[1:])
    with pytest.raises(LayoutError, match="expected text"):
        layout.parse([layout.bos, layout.kind_tag[SampleKind.PLAN], layout.sov])


def test_partial_streams_parse_with_complete_false(layout):
    rng = np.random.default_rng(8)
    s, frames, _ = dynamics_sample(layout, rng, n=2, trailing_action=True, end=False)
    p = layout.parse(s.tokens, complete=False)
    assert not p.complete and p.frames.shape[0] == 2 and p.action_bins.shape[0] == 2
    prompt = layout.exploration("explore the room", frames[:1], ["forward"], end=False)
    p = layout.parse(prompt.tokens, complete=False)
    assert p.texts == ["forward"] and p.frames.shape[0] == 1


# ----------------------------------------------------------------------------- generation grammar


def test_allowed_masks_match_ranges(layout):
    st = layout.state()
    assert st.allowed().forced == layout.bos
    for allowed in list(layout._allowed.values()) + layout._allowed_meta:
        mask = allowed.mask
        assert mask.shape == (layout.vocab_size,) and mask.dtype == torch.bool
        ids = torch.nonzero(mask).flatten().tolist()
        assert ids == sorted(i for a, b in allowed.ranges for i in range(a, b))
        assert all(i in allowed for i in ids)


def random_stream(layout, kind, seed, action_dim=None, max_tokens=300):
    """A scripted 'model' sampling uniformly among the allowed tokens (EOS rare, then taken as
    soon as it is allowed once max_tokens is reached)."""
    gen = torch.Generator().manual_seed(seed)
    st = layout.state(action_dim)
    out = []
    while not st.done:
        allowed = st.allowed()
        if allowed.name == "kind":  # the caller picks the sample kind
            token = layout.kind_tag[kind]
        elif allowed.forced is not None:
            token = allowed.forced
        elif len(out) >= max_tokens and layout.eos in allowed:
            token = layout.eos
        else:
            probs = allowed.mask.float()
            probs[layout.eos] *= 0.02
            probs[layout.sov] *= 20.0
            token = int(torch.multinomial(probs, 1, generator=gen))
        st.advance(token)
        out.append(token)
    return out, st


@pytest.mark.parametrize("kind", list(SampleKind))
def test_grammar_only_generates_parseable_streams(layout, kind):
    for seed in range(3):
        tokens, st = random_stream(layout, kind, seed, action_dim=A)
        p = layout.parse(tokens, action_dim=A)
        assert p.kind == kind and p.frames.shape[1:] == GRID
        if kind == SampleKind.DYNAMICS and p.action_bins.size:
            assert p.action_bins.shape[1:] == (layout.config.actions_per_frame, A)
        assert random_stream(layout, kind, seed, action_dim=A)[0] == tokens  # same seed, same stream


def test_grammar_forces_structure_and_restricts_ranges(layout):
    rng = np.random.default_rng(9)
    s, _, _ = dynamics_sample(layout, rng, n=1, trailing_action=True, end=False)
    st = layout.state_after(s.tokens)  # after "... EOA": the next frame or the end
    assert st.allowed().name == "SOV|EOS"
    st.advance(layout.sov)
    for m in layout.meta_ids:  # meta and SOT are forced
        assert st.allowed().forced == int(m) and st.in_image
        st.advance(int(m))
    assert st.allowed().forced == layout.sot
    st.advance(layout.sot)
    h, w = GRID
    for r in range(h):
        for c in range(w):
            allowed = st.allowed()
            assert allowed.name == "vision" and allowed.mask.sum() == K
            st.advance(layout.vision.start)
        assert st.allowed().forced == layout.eol
        st.advance(layout.eol)
    assert st.allowed().forced == layout.eov
    st.advance(layout.eov)
    assert st.allowed().name == "BOA|EOS" and not st.in_image
    st.advance(layout.boa)
    k = layout.config.actions_per_frame
    for _ in range(k * A):  # span length known from the prefix
        assert st.allowed().name == "bins"
        st.advance(layout.action.start)
    assert st.allowed().forced == layout.eoa
    # a text segment may not exceed max_text_tokens: SOV is forced after it
    st = layout.state_after([layout.bos, layout.kind_tag[SampleKind.PLAN]])
    for _ in range(layout.config.max_text_tokens):
        st.advance(layout.text.start + 5)
    assert st.allowed().forced == layout.sov
    with pytest.raises(LayoutError, match="expected SOV"):
        st.advance(layout.text.start + 5)


# ----------------------------------------------------------------------------- packing


def test_pack_keeps_images_whole_and_records_documents(layout):
    rng = np.random.default_rng(10)
    samples = [dynamics_sample(layout, rng, n=n)[0] for n in (1, 2, 4)]
    samples.append(layout.plan(TASK, codes(rng, 1)[0], ["lift the cube"], codes(rng, 1)))
    max_len = max(len(s) for s in samples[:2]) + 10
    packed = layout.pack(samples, max_len)
    R, L = packed.tokens.shape
    assert L == max_len and R >= 2
    # every token of every sample appears exactly once, in order, in its documents
    for si, s in enumerate(samples):
        docs = packed.documents[packed.documents[:, 3] == si]
        docs = docs[np.argsort(docs[:, 4])]
        pieces = [packed.tokens[row, at:at + n] for row, at, n, _, _ in docs]
        np.testing.assert_array_equal(np.concatenate(pieces), s.tokens)
        for row, at, n, _, off in docs:
            np.testing.assert_array_equal(packed.position_ids[row, at:at + n], np.arange(n))
            assert packed.weights[row, at] == 0.0
            np.testing.assert_array_equal(packed.weights[row, at + 1:at + n], s.weights[off + 1:off + n])
    # the long sample was cut, but never inside an image block or an action span
    long_docs = packed.documents[packed.documents[:, 3] == 2]
    assert len(long_docs) > 1
    for row, at, n, _, _ in long_docs:
        piece = packed.tokens[row, at:at + n]
        assert (piece == layout.sov).sum() == (piece == layout.eov).sum()
        assert (piece == layout.boa).sum() == (piece == layout.eoa).sum()
    assert len(packed.image_spans) == sum(len(s.image_spans) for s in samples)
    for row, a, b in packed.image_spans:
        assert packed.tokens[row, a - 1] == layout.sot and packed.tokens[row, b] == layout.eov
        assert len(set(packed.doc_ids[row, a - 1:b + 1].tolist())) == 1
    pad = packed.doc_ids == -1
    assert (packed.tokens[pad] == layout.pad).all() and (packed.weights[pad] == 0).all()
    assert (packed.roles[pad] == Role.PAD).all()
    # whole samples parse back out of the packed rows
    whole = [(row, at, n) for row, at, n, si, off in packed.documents if off == 0 and n == len(samples[si])]
    assert whole
    for row, at, n in whole:
        layout.parse(packed.tokens[row, at:at + n])


def test_pack_rejects_rows_shorter_than_an_image(layout):
    rng = np.random.default_rng(11)
    s, _, _ = dynamics_sample(layout, rng, n=2)
    with pytest.raises(LayoutError, match="raise max_len"):
        layout.pack([s], layout.image_block_len - 1)


# ----------------------------------------------------------------------------- previous-frame hints


def test_frame_hints_point_at_the_previous_image_cell_by_cell(layout):
    rng = np.random.default_rng(12)
    s, frames, _ = dynamics_sample(layout, rng, n=3)
    tokens = torch.as_tensor(s.tokens)[None]
    hints = layout.frame_hints(tokens)[0].numpy()
    expected = np.full(len(s), -1)
    for i, (a, b) in enumerate(s.image_spans):
        if i == 0:
            continue  # the first image has no previous image
        cells = a + layout.code_offsets  # positions of image i's codes
        expected[cells - 1] = frames[i - 1].reshape(-1)  # position p predicts token p + 1
    np.testing.assert_array_equal(hints, expected)
    # a prefix ending inside an image already has the hints of the codes still to come
    cut = int(s.image_spans[1][0]) + 2
    np.testing.assert_array_equal(layout.frame_hints(tokens[:, :cut])[0].numpy(), expected[:cut])
    # packed documents never hint across a document boundary
    other = layout.plan(TASK, codes(rng, 1)[0], ["lift the cube"], codes(rng, 1))
    packed = layout.pack([other, s], len(other) + len(s))
    assert packed.tokens.shape[0] == 1
    got = layout.frame_hints(torch.as_tensor(packed.tokens), torch.as_tensor(packed.doc_ids))[0].numpy()
    np.testing.assert_array_equal(got[len(other):], expected)
    assert (got[:len(other)] >= 0).sum() == layout.grid[0] * layout.grid[1]  # the plan's keyframe only


# ----------------------------------------------------------------------------- classifier-free guidance


@pytest.mark.parametrize("kind", list(SampleKind))
def test_drop_conditioning_is_the_unconditional_stream(layout, kind):
    from emu_world.models.generate import unconditional_prefix

    rng = np.random.default_rng(13)
    if kind == SampleKind.DYNAMICS:
        s, frames, _ = dynamics_sample(layout, rng, n=3)
    elif kind == SampleKind.PLAN:
        frames = codes(rng, 3)
        s = layout.plan(TASK, frames[0], ["lift the cube", "place it"], frames[1:])
    else:
        frames = codes(rng, 3)
        s = layout.exploration("a kitchen", frames, ["forward", "turn left"])
    u = layout.drop_conditioning(s)
    np.testing.assert_array_equal(u.tokens, unconditional_prefix(layout, s.tokens))  # one rule for both
    assert not any(t in layout.action for t in u.tokens.tolist())
    assert len(u.tokens) == len(u.weights) == len(u.roles) and not len(u.text_spans)
    assert (u.roles != Role.TEXT).all() and (u.roles != Role.ACTION).all()
    for (a, b), frame in zip(u.image_spans, frames):  # every image kept whole, codes where the spans say
        assert u.tokens[a - 1] == layout.sot and u.tokens[b] == layout.eov
        np.testing.assert_array_equal(u.tokens[a + layout.code_offsets] - layout.vision.start, frame.reshape(-1))
    assert len(u.image_spans) == len(s.image_spans)
    for a, b in u.action_spans:
        assert a == b and u.tokens[a - 1] == layout.boa and u.tokens[a] == layout.eoa
    np.testing.assert_array_equal(u.weights[u.roles == Role.VISION], s.weights[s.roles == Role.VISION])


def test_action_hints_carry_the_cell_and_the_span_before_each_image(layout):
    rng = np.random.default_rng(13)
    s, frames, bins = dynamics_sample(layout, rng, n=3)
    tokens = torch.as_tensor(s.tokens)[None]
    k, slots = layout.config.actions_per_frame, 2 * layout.config.actions_per_frame * A
    hints = layout.frame_hints(tokens, action_slots=slots)[0].numpy()  # (L, 2 + slots)
    assert hints.shape == (len(s), HINT_ACTIONS + slots)
    np.testing.assert_array_equal(hints[:, HINT_CODE], layout.frame_hints(tokens)[0].numpy())
    cells = np.full(len(s), -1)
    actions = np.full((len(s), slots), -1)
    for i, (a, _) in enumerate(s.image_spans):
        at = a + layout.code_offsets - 1  # position p predicts token p + 1
        cells[at] = np.arange(len(at))
        if i > 0:  # the span between image i - 1 and image i: the actions of frame step i - 1
            actions[at, :k * A] = bins[(i - 1) * k:i * k].reshape(-1)
    np.testing.assert_array_equal(hints[:, HINT_CELL], cells)
    np.testing.assert_array_equal(hints[:, HINT_ACTIONS:], actions)
    # a prefix cut inside the next image already has its cells and actions
    cut = int(s.image_spans[2][0]) + 2
    np.testing.assert_array_equal(layout.frame_hints(tokens[:, :cut], action_slots=slots)[0].numpy(), hints[:cut])
    with pytest.raises(ValueError, match="raise model.action_hints"):
        layout.frame_hints(tokens, action_slots=k * A - 1)
