"""The world model: presets and config checks, the Emu3.5 shape on the meta device, the weighted
loss against a hand computation, isolation of packed documents, overfitting a tiny batch, and
the checkpoint round trip with layout-mismatch rejection."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from emu_world.config import CONFIG_DIR, to_dataclass
from emu_world.models.layout import LayoutConfig, Role, SequenceLayout
from emu_world.models.text_tokenizer import load_text_tokenizer
from emu_world.models.world_model import (
    PRESETS, WorldModel, WorldModelConfig, document_mask, document_positions, next_token_loss,
)

torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the machine is shared

GRID = (2, 3)
K = 8
A = 3
TASK = "put the red block in the blue bowl"


@pytest.fixture(scope="module")
def layout():
    cfg = LayoutConfig(action_bins=16, actions_per_frame=2, max_text_tokens=24, pad_vocab_to=1)
    return SequenceLayout(cfg, load_text_tokenizer(), K, GRID)


def tiny_model(layout, seed=0, **overrides):
    torch.manual_seed(seed)
    return WorldModel(WorldModelConfig.preset("tiny", **overrides), layout).eval()


def samples(layout, seed=0):
    """One sample of each kind (dynamics, plan, exploration)."""
    rng = np.random.default_rng(seed)
    k = layout.config.actions_per_frame
    return [
        layout.dynamics(TASK, rng.integers(0, K, (3, *GRID)), rng.integers(0, 16, (3 * k, A))),
        layout.plan(TASK, rng.integers(0, K, GRID), ["reach the block", "lift it"], rng.integers(0, K, (2, *GRID))),
        layout.exploration("a kitchen", rng.integers(0, K, (3, *GRID)), ["forward", "turn left"]),
    ]


# ----------------------------------------------------------------------------- configs


def model_config(name: str) -> WorldModelConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}"])
    return to_dataclass(WorldModelConfig, cfg.model)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shipped_configs_are_the_presets(name):
    assert model_config(name) == PRESETS[name]


def test_presets_build_with_the_layout_vocabulary(layout):
    tiny = WorldModel(WorldModelConfig.preset("tiny"), layout)
    assert tiny.vocab_size == layout.vocab_size
    assert tiny.decoder.lm_head.weight is tiny.decoder.model.embed_tokens.weight  # tied
    assert 20_000 < tiny.num_parameters() < 150_000
    default = SequenceLayout(LayoutConfig(), layout.text_tokenizer, 1024, (8, 8))
    small = WorldModel(WorldModelConfig.preset("small"), default)
    assert 4_000_000 < small.num_parameters() < 10_000_000
    attn = small.decoder.model.layers[0].self_attn
    assert attn.q_norm is not None and attn.k_norm is not None  # Qwen3's QK-norm
    assert attn.k_proj.out_features * 4 == attn.q_proj.out_features  # GQA 8/2


def test_config_errors_are_clear(layout):
    with pytest.raises(ValueError, match="num_heads=6 does not divide model.hidden_size=32"):
        WorldModelConfig(hidden_size=32, num_heads=6, num_kv_heads=2)
    assert WorldModelConfig(hidden_size=32, num_heads=6, num_kv_heads=2, head_dim=8).resolved_head_dim == 8
    with pytest.raises(ValueError, match="num_kv_heads=3 does not divide model.num_heads=8"):
        WorldModelConfig(num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_implementation"):
        WorldModelConfig(attn_implementation="flash")
    with pytest.raises(ValueError, match="num_layers"):
        WorldModelConfig(num_layers=0)
    with pytest.raises(ValueError, match="vocab_size=null"):
        WorldModel(WorldModelConfig.preset("tiny", vocab_size=1000), layout)
    with pytest.raises(KeyError, match="available"):
        WorldModelConfig.preset("huge")
    with pytest.raises(ValueError, match="action_hints needs model.frame_hints=true"):
        WorldModelConfig(action_hints=6)
    with pytest.raises(ValueError, match="action_hints must be >= 0"):
        WorldModelConfig(frame_hints=True, action_hints=-1)


def test_emu35_shape_on_the_meta_device():
    with torch.device("meta"):
        model = WorldModel(WorldModelConfig.preset("emu3.5"))
    n = model.num_parameters()
    assert 34.0e9 < n < 34.2e9  # 34.1B: 31.2B in 64 layers + 2 x 1.45B untied embedding/head
    layer = model.decoder.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (64 * 128, 5120)
    assert layer.self_attn.k_proj.weight.shape == (8 * 128, 5120)
    assert layer.mlp.gate_proj.weight.shape == (25_600, 5120)
    assert model.decoder.lm_head.weight.device.type == "meta"


# ----------------------------------------------------------------------------- forward and loss


def test_forward_shapes_and_weighted_loss_by_hand(layout):
    model = tiny_model(layout)
    s = samples(layout)[0]
    tokens = torch.as_tensor(s.tokens)[None]  # (1, N)
    weights = torch.as_tensor(s.weights)[None]  # (1, N)
    roles = torch.as_tensor(s.roles)[None]
    with torch.no_grad():
        logits = model.logits(tokens)  # (1, N, V)
        loss, logs = model(tokens, weights, roles)
    assert logits.shape == (1, len(s), layout.vocab_size)
    logp = F.log_softmax(logits[0].double(), dim=-1)  # (N, V)
    num = den = 0.0
    per_role: dict[int, list[float]] = {}
    for i in range(1, len(s)):
        ce = -float(logp[i - 1, s.tokens[i]])
        num += float(s.weights[i]) * ce
        den += float(s.weights[i])
        if s.weights[i] > 0:
            per_role.setdefault(int(s.roles[i]), []).append(ce)
    assert loss.item() == pytest.approx(num / den, rel=1e-5)
    assert logs["loss"] == pytest.approx(num / den, rel=1e-5)
    assert logs["tokens"] == int((s.weights[1:] > 0).sum())
    assert logs["ce/vision"] == pytest.approx(np.mean(per_role[Role.VISION]), rel=1e-5)
    assert logs["ce/action"] == pytest.approx(np.mean(per_role[Role.ACTION]), rel=1e-5)
    assert "ce/text" not in logs  # the dynamics prompt carries weight 0
    with pytest.raises(ValueError, match="all loss weights are 0"):
        model(tokens, torch.zeros_like(weights))


def test_document_positions_and_mask():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    allowed = document_mask(doc) == 0  # (1, 1, 7, 7)
    assert allowed[0, 0, 4].tolist() == [False, False, False, True, True, False, False]
    assert allowed[0, 0, 6].tolist() == [False] * 5 + [True, True]
    assert allowed.any(dim=-1).all()  # no fully masked row


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_documents_are_isolated(layout, impl):
    model = tiny_model(layout, attn_implementation=impl)
    ss = samples(layout)
    packed = layout.pack(ss, max_len=sum(len(s) for s in ss) + 5)  # one row, three documents, padding
    assert packed.tokens.shape[0] == 1 and len(packed.documents) == 3
    inputs = model.packed_inputs(packed)
    with torch.no_grad():
        row = model.logits(inputs["tokens"], inputs["doc_ids"], inputs["position_ids"])[0]  # (L, V)
        for _, start, n, si, _ in packed.documents.tolist():
            alone = model.logits(torch.as_tensor(ss[si].tokens)[None])[0]  # (n, V)
            torch.testing.assert_close(row[start:start + n], alone, atol=1e-5, rtol=0)
        # position ids derived from doc_ids when not given (they differ only on padding)
        derived = model.logits(inputs["tokens"], inputs["doc_ids"])[0]
    real = inputs["doc_ids"][0] >= 0
    torch.testing.assert_close(derived[real], row[real], atol=0, rtol=0)
    assert torch.isfinite(row).all()


def test_tiny_model_overfits_a_tiny_batch(layout):
    model = tiny_model(layout).train()
    packed = layout.pack(samples(layout, seed=1), max_len=96)
    inputs = model.packed_inputs(packed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for step in range(300):
        loss, logs = model(**inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = logs["loss"] if first is None else first
    assert logs["loss"] < 0.1 * first, (first, logs)
    assert {"ce/vision", "ce/text", "ce/action", "ce/structure"} <= set(logs)


# ----------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_and_layout_mismatch(layout, tmp_path):
    model = tiny_model(layout, seed=3)
    model.save(tmp_path / "wm")
    meta = json.loads((tmp_path / "wm" / "config.json").read_text())
    assert meta["layout_spec"] == layout.spec and meta["config"] == asdict(model.config)
    again = WorldModel.load(tmp_path / "wm", layout).eval()
    assert again.config == model.config
    assert again.decoder.lm_head.weight is again.decoder.model.embed_tokens.weight
    tokens = torch.as_tensor(samples(layout)[1].tokens)[None]
    with torch.no_grad():
        torch.testing.assert_close(again.logits(tokens), model.logits(tokens), atol=0, rtol=0)

    # float16 export: half the bytes, a float32 model with the rounded weights, the tie kept
    model.save(tmp_path / "wm16", dtype=torch.float16)
    assert json.loads((tmp_path / "wm16" / "config.json").read_text())["dtype"] == "float16"
    half = WorldModel.load(tmp_path / "wm16", layout).eval()
    assert half.decoder.lm_head.weight is half.decoder.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in half.parameters())
    for (name, p), q in zip(model.state_dict().items(), half.state_dict().values()):
        torch.testing.assert_close(q, p.half().float(), atol=0, rtol=0, msg=name)
    assert model.decoder.lm_head.weight.dtype == torch.float32  # the saved model itself is untouched
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("wm", "wm16")}
    assert size["wm16"] < 0.6 * size["wm"], size

    other = SequenceLayout(layout.config, layout.text_tokenizer, 2 * K, GRID)
    with pytest.raises(ValueError, match=r"codebook_size: checkpoint 8 vs layout 16.*Build the layout"):
        WorldModel.load(tmp_path / "wm", other)
    meta["format"] = "something else"
    (tmp_path / "wm" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expected 'emu_world.world_model'"):
        WorldModel.load(tmp_path / "wm", layout)
    with pytest.raises(FileNotFoundError, match="not a world model checkpoint"):
        WorldModel.load(tmp_path / "missing", layout)



def test_int8_export_rounds_each_row_and_loads_as_float32(layout, tmp_path):
    """world_model.export_dtype=int8: matrices as int8 with a float16 scale per row, vectors float16;
    the load dequantizes into a float32 model (tie kept) whose logits stay close to the original's."""
    from safetensors.torch import load_file

    from emu_world.models.world_model import dequantize_int8, quantize_int8

    model = tiny_model(layout, seed=3)
    with torch.no_grad():  # the zero-initialised last action layer, randomised so that it is exercised
        model.action_mlp[2].weight.normal_(std=0.02)
    model.save(tmp_path / "wm")
    model.save(tmp_path / "wm8", dtype=torch.int8)
    meta = json.loads((tmp_path / "wm8" / "config.json").read_text())
    assert meta["dtype"] == "int8" and "per-row" in meta["quantization"]
    stored = load_file(str(tmp_path / "wm8" / "model.safetensors"))
    embed = "decoder.model.embed_tokens.weight"
    assert stored[embed].dtype == torch.int8 and stored[embed + ".scale"].shape == (layout.vocab_size,)
    assert "decoder.lm_head.weight" not in stored  # the tied head is stored once
    assert stored["decoder.model.norm.weight"].dtype == torch.float16

    q = WorldModel.load(tmp_path / "wm8", layout).eval()
    assert q.decoder.lm_head.weight is q.decoder.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in q.parameters())
    for name, p in model.state_dict().items():  # every weight within half a step of its row's scale
        got = q.state_dict()[name]
        if p.dim() >= 2:
            step = p.reshape(p.shape[0], -1).abs().amax(1).half().float() / 127
            err = (got - p).reshape(p.shape[0], -1).abs().amax(1)
            assert (err <= step * 0.5 + 1e-3 * step + 1e-8).all(), name
        else:
            torch.testing.assert_close(got, p.half().float(), atol=0, rtol=0, msg=name)
    tokens = torch.as_tensor(samples(layout)[1].tokens)[None]
    with torch.no_grad():
        a, b = model.logits(tokens), q.logits(tokens)
    assert not torch.equal(a, b)  # rounded ...
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # ... but close
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("wm", "wm8")}
    assert size["wm8"] < 0.3 * size["wm"], size

    zero = {"w": torch.zeros(3, 4), "v": torch.ones(2), "i": torch.arange(3)}  # an all-zero row is exact
    back = dequantize_int8(quantize_int8(zero))
    assert torch.equal(back["w"], zero["w"]) and torch.equal(back["i"], zero["i"])
    with pytest.raises(ValueError, match="not an int8 export"):
        dequantize_int8({"w": torch.zeros(2, 2, dtype=torch.int8)})


def test_packed_sdpa_matches_the_block_mask_in_values_and_gradients(layout):
    """model.attn_implementation=sdpa runs one causal call per packed document; the same rows
    through the 4-D block-diagonal mask give the same logits and the same gradients."""
    from emu_world.models.world_model import PACKED_SDPA, document_segments

    model = tiny_model(layout)
    assert model.decoder.config._attn_implementation == PACKED_SDPA
    ss = samples(layout, seed=2)
    packed = layout.pack(ss + ss, max_len=sum(len(s) for s in ss) + 7)  # rows with several documents, padding
    inputs = model.packed_inputs(packed)
    doc = inputs["doc_ids"]
    assert doc.shape[0] >= 2 and max(len(r) for r in document_segments(doc)) >= 3
    for row, runs in zip(doc.tolist(), document_segments(doc)):
        assert runs[0][0] == 0 and runs[-1][1] == len(row)
        assert all(e == s2 for (_, e), (s2, _) in zip(runs, runs[1:]))  # they tile the row
        assert all(len(set(row[s:e])) == 1 for s, e in runs)  # one document each
        assert all(row[e - 1] != row[e] for _, e in runs[:-1])  # maximal

    def run(masked: bool):
        model.zero_grad(set_to_none=True)
        if masked:
            logits = model.logits(inputs["tokens"], position_ids=inputs["position_ids"],
                                  attention_mask=document_mask(doc), hints=model.hints_for(inputs["tokens"], doc))
        else:
            logits = model.logits(inputs["tokens"], doc, inputs["position_ids"])
        loss, _ = next_token_loss(logits, inputs["tokens"], inputs["weights"])
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    segmented, grads_s = run(False)
    masked, grads_m = run(True)
    torch.testing.assert_close(segmented, masked, atol=1e-5, rtol=1e-5)
    assert grads_s.keys() == grads_m.keys() and len(grads_s) > 5
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_m[name], atol=1e-6, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- action hints


def action_hint_model(layout, seed=0):
    """A tiny model with action hints whose action MLP is not at its (zero) initial output, so the
    action path is exercised."""
    model = tiny_model(layout, seed, action_hints=layout.config.actions_per_frame * A)
    with torch.no_grad():
        torch.nn.init.normal_(model.action_mlp[2].weight, std=0.5)
    return model


def test_action_hints_reach_the_next_image_only_and_survive_a_round_trip(layout, tmp_path):
    model = action_hint_model(layout, seed=4)
    sample = samples(layout)[0]  # f0 BOA a EOA f1 BOA a EOA f2 ...
    tokens = torch.as_tensor(sample.tokens)[None]
    assert model.hints_for(tokens).shape == (1, len(sample), 2 + layout.config.actions_per_frame * A)
    (s0, e0), (s1, _) = sample.action_spans[0], sample.image_spans[1]
    changed = tokens.clone()
    changed[0, s0] = layout.action.start + (int(tokens[0, s0]) - layout.action.start + 5) % 16  # one bin moves
    with torch.no_grad():
        before, after = model.logits(tokens), model.logits(changed)
    torch.testing.assert_close(after[:, :s0], before[:, :s0], atol=0, rtol=0)  # causal
    at = s1 + torch.as_tensor(layout.code_offsets) - 1  # positions predicting image 1's codes
    other = model.logits(changed, hints=model.hints_for(tokens))  # same ids, the old hints
    # the bin reaches image 1's predictions through the hints as well as through attention
    assert not torch.allclose(after[0, at], other[0, at])
    assert (after[0, at] - before[0, at]).abs().amax() > 1e-4

    model.save(tmp_path / "wm")
    again = WorldModel.load(tmp_path / "wm", layout).eval()
    assert again.config.action_hints == model.config.action_hints
    with torch.no_grad():
        torch.testing.assert_close(again.logits(tokens), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"pass hints of shape"):
        model.logits(tokens, hints=layout.frame_hints(tokens))  # 2-D hints for an action-hint model
