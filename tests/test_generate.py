"""Generation: grammar-valid streams from a random model for every sample kind, determinism,
forced tokens never sampled, KV-cached decoding equal to a no-cache reference, stopping rules,
and classifier-free guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emu_world.models.generate import GenerationConfig, Generator, Sampling, unconditional_prefix
from emu_world.models.layout import LayoutConfig, LayoutError, SampleKind, SequenceLayout
from emu_world.models.text_tokenizer import load_text_tokenizer
from emu_world.models.world_model import WorldModel, WorldModelConfig

torch.set_num_threads(1)

GRID = (2, 3)
K = 8
A = 3
TASK = "put the red block in the blue bowl"
GREEDY = GenerationConfig(vision=Sampling(0.0), text=Sampling(0.0), action=Sampling(0.0))


@pytest.fixture(scope="module")
def layout():
    cfg = LayoutConfig(action_bins=16, actions_per_frame=2, max_text_tokens=24, pad_vocab_to=1)
    return SequenceLayout(cfg, load_text_tokenizer(), K, GRID)


@pytest.fixture(scope="module")
def model(layout):
    torch.manual_seed(0)
    return WorldModel(WorldModelConfig.preset("tiny"), layout).eval()  # random weights


def prompts(layout):
    """A generation prompt of each kind, each ending where the model must continue."""
    rng = np.random.default_rng(0)
    k = layout.config.actions_per_frame
    return {
        SampleKind.DYNAMICS: layout.dynamics(TASK, rng.integers(0, K, (1, *GRID)), rng.integers(0, 16, (k, A)),
                                             end=False).tokens,  # ... f0 BOA a0 EOA: next frame
        SampleKind.PLAN: layout.plan(TASK, rng.integers(0, K, GRID), [], [], end=False).tokens,  # ... o_t
        SampleKind.EXPLORATION: layout.exploration("a kitchen", rng.integers(0, K, (1, *GRID)), [],
                                                   end=False).tokens,  # ... f0
    }


def block_overhead(layout):
    """Forced tokens of one image after SOV: meta, SOT, one EOL per row, EOV."""
    return len(layout.meta_ids) + 1 + GRID[0] + 1


@pytest.mark.parametrize("kind", list(SampleKind))
def test_random_model_streams_obey_the_grammar(layout, model, kind):
    gen = Generator(model, layout, GenerationConfig(text=Sampling(1.0)), action_dim=A)
    prefix = prompts(layout)[kind]
    spans = 2 if kind == SampleKind.DYNAMICS else 0
    for seed in range(3):
        out = gen.generate(prefix, images=2, action_spans=spans, seed=seed)
        assert out.stop == "target"
        p = out.parsed
        assert p is not None and p.kind == kind
        assert np.array_equal(out.tokens[:len(prefix)], prefix)
        n0 = layout.parse(prefix, complete=False, action_dim=A).frames.shape[0]
        assert p.frames.shape == (n0 + 2, *GRID)
        assert out.sampled["vision"] == 2 * GRID[0] * GRID[1]  # codes sampled, structure forced
        if kind == SampleKind.DYNAMICS:
            assert p.action_bins.shape[1:] == (layout.config.actions_per_frame, A)
            assert out.sampled["action"] >= 2 * layout.config.actions_per_frame * A
        else:
            assert len(p.texts) >= 1 and out.sampled["text"] >= len(p.texts)
        assert sum(out.sampled.values()) + out.forced == len(out.new_tokens)


def test_same_seed_same_stream_and_greedy_ignores_the_seed(layout, model):
    prefix = prompts(layout)[SampleKind.EXPLORATION]
    gen = Generator(model, layout, GenerationConfig(text=Sampling(1.0)))
    a, b = (gen.generate(prefix, images=2, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    streams = {tuple(gen.generate(prefix, images=2, seed=s).new_tokens.tolist()) for s in range(4)}
    assert len(streams) > 1  # sampling does depend on the seed
    greedy = Generator(model, layout, GREEDY)
    g = [greedy.generate(prefix, images=2, seed=s).tokens for s in range(3)]
    assert all(np.array_equal(g[0], x) for x in g[1:])


def test_forced_tokens_are_never_sampled_and_runs_share_a_forward_pass(layout, model):
    prefix = prompts(layout)[SampleKind.DYNAMICS]  # ends with EOA: SOV|EOS, EOS banned -> SOV forced
    out = Generator(model, layout, action_dim=A).generate_frame(prefix, seed=0)
    h, w = GRID
    assert out.codes.shape == GRID and out.codes.min() >= 0 and out.codes.max() < K
    r = out.result
    assert r.sampled == {"vision": h * w, "text": 0, "action": 0}
    assert r.forced == 1 + block_overhead(layout)  # SOV, meta, SOT, EOLs, EOV
    assert r.forward_passes == h * w  # prefill + the SOV-meta-SOT run in one pass, every EOL with the next code
    assert r.new_tokens[0] == layout.sov and r.new_tokens[-1] == layout.eov

    acts = Generator(model, layout, action_dim=A).generate_actions(r.tokens, seed=0)
    assert acts.bins.shape == (layout.config.actions_per_frame, A)
    assert acts.result.forced == 2 and acts.result.sampled["action"] == acts.bins.size  # BOA, EOA forced
    with pytest.raises(ValueError, match="no action spans"):
        Generator(model, layout).generate_actions(prompts(layout)[SampleKind.PLAN])


def greedy_reference(model, layout, prefix, images):
    """No cache: the whole sequence through the model for every sampled token, same grammar."""
    st = layout.state_after(prefix, A)
    seq = list(prefix)
    done = st.images + images
    while st.images < done:
        allowed = st.allowed()
        ranges = [r for r in allowed.ranges if r != (layout.eos, layout.eos + 1)]  # no EOS before the target
        if len(ranges) == 1 and ranges[0][1] - ranges[0][0] == 1:
            token = ranges[0][0]
        else:
            with torch.no_grad():
                logits = model.logits(torch.tensor([seq]))[0, -1]  # (V,)
            mask = torch.zeros_like(logits, dtype=torch.bool)
            for a, b in ranges:
                mask[a:b] = True
            token = int(logits.masked_fill(~mask, float("-inf")).argmax())
        st.advance(token)
        seq.append(token)
    return seq


@pytest.mark.parametrize("action_hints", [0, 6])
@pytest.mark.parametrize("kind", [SampleKind.DYNAMICS, SampleKind.PLAN])
def test_kv_cached_generation_matches_a_no_cache_reference(layout, kind, action_hints):
    """The cached hints of every new position (cell and action channels included) are the full row's."""
    torch.manual_seed(1)
    model = WorldModel(WorldModelConfig.preset("tiny", action_hints=action_hints), layout).eval()
    if action_hints:
        with torch.no_grad():
            torch.nn.init.normal_(model.action_mlp[2].weight, std=0.5)  # not the zero initial output
    prefix = prompts(layout)[kind]
    out = Generator(model, layout, GREEDY, action_dim=A).generate(prefix, images=2)
    assert out.tokens.tolist() == greedy_reference(model, layout, prefix.tolist(), images=2)


def test_stops_at_eos_and_at_the_budget(layout, model):
    prefix = prompts(layout)[SampleKind.EXPLORATION]  # after an image: text or EOS
    eos = layout.eos

    def favour_eos(module, args, output):  # a scripted model that always wants to stop
        output.logits[..., eos] += 100.0
        return output

    handle = model.decoder.register_forward_hook(favour_eos)
    try:
        gen = Generator(model, layout)
        out = gen.generate(prefix, seed=0)
        assert out.stop == "eos" and out.new_tokens.tolist() == [eos] and out.parsed.complete
        frame = gen.generate_frame(prefix, seed=0)  # EOS is banned until the image is done
        assert frame.result.stop == "target" and eos not in frame.result.new_tokens
    finally:
        handle.remove()
    out = Generator(model, layout).generate(prefix, images=1, max_new_tokens=3, seed=0)
    assert out.stop == "budget" and len(out.new_tokens) == 3
    with pytest.raises(RuntimeError, match="raise max_new_tokens"):
        Generator(model, layout).generate_frame(prefix, max_new_tokens=3)
    with pytest.raises(LayoutError):
        Generator(model, layout).generate([layout.bos, layout.eos])


def test_unconditional_prefix_drops_text_and_actions(layout):
    prefix = prompts(layout)[SampleKind.DYNAMICS]
    u = unconditional_prefix(layout, prefix, A)
    block = layout.image_block_len
    sov = prefix.tolist().index(layout.sov)  # the prefix's image, after BOS DYN task
    assert u[:2] == [layout.bos, layout.kind_tag[SampleKind.DYNAMICS]]
    assert u[2:2 + block] == prefix[sov:sov + block].tolist()  # images and their meta text stay
    assert u[-2:] == [layout.boa, layout.eoa] and len(u) == 2 + block + 2
    assert not any(t in layout.action for t in u)


def test_cfg_scale_one_equals_no_guidance(layout, model):
    prefix = prompts(layout)[SampleKind.EXPLORATION]
    plain = Generator(model, layout, GenerationConfig(text=Sampling(1.0)))
    guided = Generator(model, layout, GenerationConfig(text=Sampling(1.0), cfg_scale=1.0))
    a, b = plain.generate(prefix, images=2, seed=3), guided.generate(prefix, images=2, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert b.forward_passes == a.forward_passes + 2 * GRID[0] * GRID[1]  # one unconditional pass per code
    strong = Generator(model, layout, GenerationConfig(vision=Sampling(0.0), text=Sampling(0.0), cfg_scale=5.0))
    out = strong.generate(prefix, images=2, seed=0)
    assert out.parsed is not None and out.parsed.frames.shape[0] == 3
