"""The IBQ vision tokenizer (emu_world/tokenizer.py): shapes, round trips, the IBQ gradient
property, files and identities, clear errors; the tiny config comes from Hydra's compose API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu_world.config import CONFIG_DIR, to_dataclass
from emu_world.image_metrics import code_usage, psnr, ssim
from emu_world.models.tokenizer import (
    Emu3VisionTokenizer, TokenizerConfig, check_same_codes, VisionTokenizer, load_tokenizer, tensor_to_frames,
)


def tiny_config(*overrides: str) -> TokenizerConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=tiny", *overrides])
    return to_dataclass(TokenizerConfig, cfg.tokenizer)


@pytest.fixture
def tiny() -> VisionTokenizer:
    torch.manual_seed(0)
    return VisionTokenizer(tiny_config()).eval()


def frames(n: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "tokenizer").glob("*.yaml")))
def test_every_tokenizer_yaml_builds_a_valid_config(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"tokenizer={name}"])
    tc = to_dataclass(TokenizerConfig, cfg.tokenizer)
    assert tc.image_size % tc.downsample == 0 and tc.tokens_per_frame == tc.grid[0] * tc.grid[1]


def test_default_config_is_128px_f8_256_tokens():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        tc = to_dataclass(TokenizerConfig, compose(config_name="train").tokenizer)
    assert (tc.image_size, tc.downsample, tc.tokens_per_frame) == (128, 8, 256)


def test_shapes(tiny):
    cfg = tiny.config
    assert cfg.grid == (4, 4) and tiny.tokens_per_frame == 16
    x = frames()
    codes = tiny.encode(x)
    assert codes.shape == (5, 4, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < cfg.codebook_size
    out = tiny.decode(codes)
    assert out.shape == (5, 32, 32, 3) and out.dtype == torch.uint8
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    fwd = tiny(t)
    assert fwd.recon.shape == (5, 3, 32, 32) and fwd.z.shape == (5, cfg.code_dim, 4, 4)
    assert fwd.quant.z_q.shape == fwd.z.shape and fwd.codes.shape == (5, 4, 4)
    assert torch.equal(fwd.codes, codes)  # the training path picks the same codes as encode()
    assert tiny.encode(x[:0]).shape == (0, 4, 4)


def test_encode_decode_round_trip_and_batching(tiny):
    x = frames(7)
    codes = tiny.encode(x, batch_size=3)
    assert torch.equal(codes, tiny.encode(x, batch_size=64))  # batching changes nothing
    recon = tiny.decode(codes, batch_size=2)
    assert torch.equal(recon, tiny.decode(codes.numpy()))
    # decoding is a deterministic function of the codes, and the decoded frames re-encode to
    # frames that decode to themselves (a fixed point after one round)
    again = tiny.decode(tiny.encode(recon))
    assert torch.equal(tiny.decode(tiny.encode(again)), tiny.decode(tiny.encode(again)))
    fwd = tiny(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(tensor_to_frames(fwd.recon), recon)  # straight-through value = decode of the codes


def test_bfloat16_decode_gives_the_float32_frames_up_to_rounding(tiny):
    codes = tiny.encode(frames(4))
    full = tiny.decode(codes).int()
    half = tiny.decode(codes, precision="bfloat16")
    assert half.dtype == torch.uint8 and half.shape == full.shape
    assert (half.int() - full).abs().float().mean() < 2.0  # grey levels; bfloat16 keeps 8 bits of mantissa
    with pytest.raises(ValueError, match="float16"):
        tiny.decode(codes, precision="float16")


def test_ibq_gradients_reach_unused_codes(tiny):
    """Index backpropagation: the one-hot's gradient flows through the softmax over all codes."""
    q = tiny.quantizer
    z = torch.nn.functional.normalize(torch.randn(2, tiny.config.code_dim, 4, 4), dim=1).requires_grad_()
    out = q(z)
    target = torch.randn_like(out.z_q)
    ((out.z_q - target) ** 2).mean().backward()
    used = torch.unique(out.codes)
    unused = torch.ones(tiny.codebook_size, dtype=torch.bool)
    unused[used] = False
    assert unused.sum() > 0
    grad_rows = q.codebook.grad.norm(dim=1)
    assert (grad_rows[unused] > 0).all(), "every code, picked or not, gets gradient"
    assert z.grad is not None and z.grad.abs().sum() > 0  # and the encoder too
    # a plain VQ lookup would give unused codes no gradient at all
    q.codebook.grad = None
    plain = torch.nn.functional.embedding(out.codes, q.normalized_codebook())
    ((plain - target.permute(0, 2, 3, 1)) ** 2).mean().backward()
    assert (q.codebook.grad.norm(dim=1)[unused] == 0).all()


def test_quantizer_matches_the_one_hot_index_formulation(tiny):
    """The quantiser's values and gradients (encoder and codebook) equal IBQ written out with the
    (N, K) one-hot: zq = (one_hot - sg(softmax) + softmax) @ codebook, entropy -sum p log p."""
    q = tiny.quantizer
    z0 = torch.nn.functional.normalize(torch.randn(2, tiny.config.code_dim, 4, 4), dim=1)
    target = torch.randn(2, tiny.config.code_dim, 4, 4)

    def grads(fn):
        q.codebook.grad = None
        z = z0.clone().requires_grad_()
        zq, entropy = fn(z)
        (((zq - target) ** 2).mean() + entropy).backward()
        return zq.detach(), entropy.detach(), z.grad, q.codebook.grad.clone()

    def reference(z):
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        cb = q.normalized_codebook()
        logits = q.logit_scale * zf @ cb.T
        soft = logits.softmax(-1)
        index = torch.nn.functional.one_hot(logits.argmax(-1), cb.shape[0]).float() - soft.detach() + soft
        p = soft.mean(0)
        entropy = -(soft * logits.log_softmax(-1)).sum(-1).mean() + (p * torch.log(p + 1e-10)).sum()
        return (index @ cb).view(2, 4, 4, -1).permute(0, 3, 1, 2), entropy

    def ours(z):
        out = q(z)
        return out.z_q, out.entropy_loss

    for a, b in zip(grads(ours), grads(reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_soft_assignment_backward_matches_autograd_in_float64():
    """The quantiser's hand-written (N, K) backward against autograd's numerical check, with every
    output weighted (IBQ's soft lookup, per-token entropy, batch entropy)."""
    from emu_world.models.tokenizer import _SoftAssignment

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 10, generator=g, dtype=torch.float64)).requires_grad_()
    codebook = torch.randn(10, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: _SoftAssignment.apply(t, codebook), (logits,))


def test_quantizer_computes_in_float32_under_bfloat16_autocast(tiny):
    """Codes and IBQ terms in float32 inside a bfloat16 autocast region (train.precision=bfloat16):
    the codes are those of float32 ``nearest``, as ``encode`` computes them."""
    q = tiny.quantizer
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2, tiny.config.code_dim, 4, 4, generator=g), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = q(z), q.logits(z)
    assert out.z_q.dtype == logits.dtype == out.entropy_loss.dtype == torch.float32
    assert torch.equal(out.codes, q.nearest(z)) and torch.equal(logits.argmax(-1).view(2, 4, 4), out.codes)
    torch.testing.assert_close(out.z_q, q(z).z_q)


def test_quantizer_terms_are_finite_and_counts_sum(tiny):
    z = torch.nn.functional.normalize(torch.randn(3, tiny.config.code_dim, 4, 4), dim=1)
    out = tiny.quantizer(z)
    for t in (out.commit_loss, out.quant_loss, out.entropy_loss):
        assert torch.isfinite(t)
    assert out.counts.sum() == 3 * 16 and out.counts.shape == (tiny.codebook_size,)


def test_save_load_round_trip_and_identity(tiny, tmp_path):
    x = frames()
    path = tiny.save(tmp_path / "tok")
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "config.json"}
    meta = json.loads((path / "config.json").read_text())
    assert meta["identity"] == tiny.identity() and meta["tokens_per_frame"] == 16
    loaded = VisionTokenizer.load(path)
    assert loaded.identity() == tiny.identity()
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    assert torch.equal(loaded.decode(tiny.encode(x)), tiny.decode(tiny.encode(x)))
    assert isinstance(load_tokenizer(path), VisionTokenizer)
    # fp16 files: the identity written is the one the loaded model reports; saving again replaces
    path16 = tiny.save(tmp_path / "tok", dtype=torch.float16)
    loaded16 = VisionTokenizer.load(path16)
    meta16 = json.loads((path16 / "config.json").read_text())
    assert meta16["identity"] == loaded16.identity() and meta16["code_identity"] == loaded16.code_identity()
    assert loaded16.identity() != tiny.identity()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folders left
    # identity is a valid token-store key and changes with the weights
    from emu_world.data.token_store import TokenStore

    store = TokenStore(tmp_path / "tokens", loaded.identity())
    store.write(0, "observation.images.top", loaded.encode(x).numpy())
    assert np.array_equal(store.read(0, "observation.images.top"), loaded.encode(x).numpy())
    with torch.no_grad():
        loaded.decoder.head.bias.add_(1e-3)
    assert loaded.identity() != tiny.identity()


def test_mismatched_config_is_rejected_with_a_clear_message(tiny, tmp_path):
    path = tiny.save(tmp_path / "tok")
    other = tiny_config("tokenizer.codebook_size=32")
    with pytest.raises(ValueError, match=r"codebook_size: config 32 vs checkpoint 64"):
        VisionTokenizer.load(path, config=other)
    # weights that do not fit (config.json edited by hand, or files mixed up)
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["code_dim"] = 4
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit this model"):
        VisionTokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VisionTokenizer.load(tmp_path)


def test_bad_inputs_name_the_problem(tiny):
    with pytest.raises(ValueError, match="tokenizer reads 32x32"):
        tiny.encode(frames(size=64))
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode(frames().astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        tiny.encode(frames()[0])
    with pytest.raises(ValueError, match="0..63"):
        tiny.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match=r"\(B, 4, 4\)"):
        tiny.decode(torch.zeros((1, 8, 8), dtype=torch.long))


def test_config_checks():
    with pytest.raises(ValueError, match="not divisible"):
        TokenizerConfig(image_size=100, stem_stride=4, channels=[16, 32])
    with pytest.raises(ValueError, match="decoder_blocks"):
        TokenizerConfig(channels=[16, 32], encoder_blocks=[1, 1], decoder_blocks=[1, 1, 1])
    with pytest.raises(ValueError, match="norm_groups"):
        TokenizerConfig(channels=[12, 32], encoder_blocks=1, decoder_blocks=1)
    assert TokenizerConfig(channels=[16, 32], encoder_blocks=2, decoder_blocks=1).encoder_blocks == [2, 2]
    with pytest.raises(ValueError, match="unknown key"):
        TokenizerConfig.from_dict({"image_size": 32, "nope": 1})
    with pytest.raises(ValueError, match="stem_stride divisible by 8"):
        TokenizerConfig(channels=[16, 32], encoder_blocks=1, decoder_blocks=1, decoder_upsample=[8, 8, 8])


def test_decoder_upsample_levels_leave_codes_and_old_identities_alone():
    """decoder_upsample adds decoder-only levels above the stem resolution: same code grid and
    encoder, a 2x finer head; a config at the default keeps the identity it had before the option."""
    torch.manual_seed(0)
    base = VisionTokenizer(tiny_config()).eval()
    torch.manual_seed(0)
    fine = VisionTokenizer(tiny_config("tokenizer.decoder_upsample=[8]")).eval()
    assert fine.grid == base.grid and fine.decoder.head.out_channels == 3 * 2 * 2
    x = torch.as_tensor(frames(2)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert fine(x).recon.shape == x.shape
    torch.testing.assert_close(fine.encode(frames(2)), base.encode(frames(2)))  # same seed: same encoder
    assert fine.decode(fine.encode(frames(2))).shape == (2, 32, 32, 3)
    # the identity of a default config hashes exactly the keys that existed before the option
    import hashlib
    described = {k: v for k, v in base.config.to_dict().items() if k != "decoder_upsample"}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, tensor in sorted(base.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    assert base.identity().endswith(digest.hexdigest()[:16])
    assert fine.identity() != base.identity()
    # ... but both map frames to the same codes: same code identity; an encoder or codebook change alters it
    assert fine.code_identity() == base.code_identity() != base.identity()
    other = VisionTokenizer(tiny_config()).eval()
    other.load_state_dict(base.state_dict())
    assert other.code_identity() == base.code_identity()
    with torch.no_grad():
        other.decoder.head.bias.add_(0.1)
    assert other.code_identity() == base.code_identity() and other.identity() != base.identity()
    with torch.no_grad():
        other.quantizer.codebook[0, 0] += 0.1
    assert other.code_identity() != base.code_identity()


def test_check_same_codes_accepts_another_decoder_for_the_same_codes():
    torch.manual_seed(0)
    base = VisionTokenizer(tiny_config()).eval()
    torch.manual_seed(0)
    fine = VisionTokenizer(tiny_config("tokenizer.decoder_upsample=[8]")).eval()
    recorded = {"path": "tok", "identity": base.identity(), "code_identity": base.code_identity()}
    check_same_codes(recorded, base, "model m", "fix")
    check_same_codes(recorded, fine, "model m", "fix")  # other decoder, same codes
    # a manifest from before code identities: the full identity must match
    old = {"path": "tok", "identity": base.identity()}
    check_same_codes(old, base, "model m", "fix")
    with pytest.raises(ValueError, match="model m was trained on codes of tokenizer .* other codes; fix"):
        check_same_codes(old, fine, "model m", "fix")
    torch.manual_seed(1)
    stranger = VisionTokenizer(tiny_config()).eval()
    with pytest.raises(ValueError, match="maps frames to other codes"):
        check_same_codes(recorded, stranger, "model m", "fix")


def test_image_metrics():
    x = frames(4)
    assert psnr(x, x) == 100.0 and ssim(x, x) == pytest.approx(1.0)
    y = np.clip(x.astype(int) + 4, 0, 255).astype(np.uint8)
    assert 30 < psnr(x, y) < 40 and ssim(x, y) < 1.0
    use = code_usage(torch.tensor([[0, 1], [1, 1]]), 4)
    assert use["code_usage"] == 0.5 and use["codes_used"] == 2 and 1 < use["perplexity"] < 2


def test_real_emu3_tokenizer_from_a_local_folder(tmp_path):
    """A (randomly initialised, tiny) transformers Emu3VQVAE saved locally opens through load_tokenizer."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                                       channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[],
                                       temporal_downsample_factor=1, hidden_size=32)
    torch.manual_seed(0)
    transformers.Emu3VQVAE(cfg).save_pretrained(tmp_path / "emu3")
    tok = load_tokenizer(tmp_path / "emu3", image_size=16)
    assert isinstance(tok, Emu3VisionTokenizer) and tok.grid == (8, 8) and tok.codebook_size == 64
    codes = tok.encode(frames(2, size=16))
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 64
    assert tok.decode(codes).shape == (2, 16, 16, 3)
    assert tok.identity().startswith("emu3-f2-k64-")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path / "other")


def test_local_encoder_codes_depend_only_on_their_own_patch():
    """local_encoder=true: changing pixels outside a patch never changes that patch's code, so
    static regions keep identical codes while something else in the frame moves."""
    torch.manual_seed(0)
    tok = VisionTokenizer(tiny_config("tokenizer.local_encoder=true")).eval()
    f = tok.config.downsample
    x = frames(4, seed=3)
    moved = x.copy()
    moved[:, :f, :f] = 255 - moved[:, :f, :f]  # repaint the top-left patch only
    before, after = tok.encode(x), tok.encode(moved)
    unchanged = torch.ones_like(before, dtype=torch.bool)
    unchanged[:, 0, 0] = False
    assert torch.equal(before[unchanged], after[unchanged])
    # the GroupNorm encoder mixes the whole image into every code (image-wide statistics)
    z = VisionTokenizer(tiny_config()).eval().encode_latents
    t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        assert not torch.allclose(z(t(x))[:, :, 1:, 1:], z(t(moved))[:, :, 1:, 1:])
