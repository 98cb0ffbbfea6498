"""Filling the token cache (emu_world.data.tokenize): codes equal the tokenizer's, complete entries
are skipped, another tokenizer writes elsewhere, frame-size mismatches are refused or resized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu_world.config import CONFIG_DIR, AgentConfig, EnvConfig, to_dataclass
from emu_world.data.robot_dataset import RobotDataset
from emu_world.data.tokenize import main, open_token_store, token_cache_dir, tokenize_dataset
from emu_world.record import record
from emu_world.models.tokenizer import TokenizerConfig, VisionTokenizer

torch.set_num_threads(1)  # tiny convolutions; the machine is shared

CAMERA = "observation.images.front"


def tiny_tokenizer(seed: int = 0, *overrides: str) -> VisionTokenizer:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["tokenizer=tiny", *overrides])
    torch.manual_seed(seed)
    return VisionTokenizer(to_dataclass(TokenizerConfig, cfg.tokenizer)).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "widowx"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="record", overrides=["env=widowx_pick_place", "env.max_episode_steps=40",
                                                       "env.image_size=32"])
    record(to_dataclass(EnvConfig, cfg.env), to_dataclass(AgentConfig, cfg.agent), root, "test/widowx", episodes=2,
           seed=0, keep_failures=True, progress=False)
    return root


def test_cache_is_filled_with_the_tokenizer_codes_then_skipped(dataset, tmp_path):
    tok = tiny_tokenizer()
    cache = tmp_path / "cache"
    first = tokenize_dataset(dataset, tok, cache_root=cache, batch_size=7, threads=1)
    ds = RobotDataset(dataset)
    lengths = [ds.episode(i, decode=False).length for i in range(2)]
    assert (first.episodes, first.encoded, first.skipped, first.frames) == (2, 2, 0, sum(lengths))
    assert first.tokenizer_id == tok.identity() and first.frames_per_s > 0
    store = open_token_store(dataset, tok.identity(), cache)
    assert store.root == token_cache_dir(dataset, cache) and store.root.parent == cache
    assert not (dataset / "tokens").exists()  # the dataset folder is left alone with a cache root
    for i in range(2):
        frames = ds.episode(i).frames[CAMERA]  # (T, 32, 32, 3)
        np.testing.assert_array_equal(store.read(i, CAMERA), tok.encode(frames).numpy())
        assert store.attributes(i, CAMERA)["source"]["episode_length"] == lengths[i]

    again = tokenize_dataset(dataset, tok, cache_root=cache, threads=1)
    assert (again.encoded, again.skipped, again.frames) == (0, 2, 0)

    store.write(0, CAMERA, store.read(0, CAMERA)[:-1])  # a wrong-length entry is encoded again
    fixed = tokenize_dataset(dataset, tok, cache_root=cache, threads=1)
    assert (fixed.encoded, fixed.skipped, fixed.frames) == (1, 1, lengths[0])
    assert store.num_frames(0, CAMERA) == lengths[0]


def test_other_tokenizer_writes_elsewhere(dataset, tmp_path):
    a, b = tiny_tokenizer(0), tiny_tokenizer(1)
    assert a.identity() != b.identity()
    cache = tmp_path / "cache"
    tokenize_dataset(dataset, a, cache_root=cache, threads=1)
    result = tokenize_dataset(dataset, b, cache_root=cache, threads=1)
    assert result.encoded == 2  # nothing of a's is reused
    written = sorted(p.name for p in cache.glob("*/*") if not p.name.startswith("."))
    assert written == sorted([a.identity(), b.identity()])
    sa, sb = open_token_store(dataset, a.identity(), cache), open_token_store(dataset, b.identity(), cache)
    assert sa.entries() == sb.entries() == [(0, CAMERA), (1, CAMERA)]


def test_frame_size_mismatch_is_refused_or_resized(dataset, tmp_path):
    big = tiny_tokenizer(0, "tokenizer.image_size=64")
    with pytest.raises(ValueError, match=r"32x32 frames but the tokenizer reads 64x64.*--resize"):
        tokenize_dataset(dataset, big, cache_root=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before writing anything
    result = tokenize_dataset(dataset, big, cache_root=tmp_path, resize=True, threads=1)
    store = open_token_store(dataset, big.identity(), tmp_path)
    assert result.encoded == 2 and store.read(1, CAMERA).shape[1:] == (8, 8)
    assert store.attributes(1, CAMERA)["source"]["resized"] is True


def test_cli_prints_one_json_line(dataset, tmp_path, capsys):
    tok = tiny_tokenizer()
    tok.save(tmp_path / "tok")
    main([str(dataset), "--tokenizer", str(tmp_path / "tok"), "--cache-root", str(tmp_path / "c"), "--threads", "1"])
    line = json.loads(capsys.readouterr().out.strip())
    assert line["episodes"] == 2 and line["encoded"] == 2 and line["frames"] > 0 and line["frames_per_s"] > 0
    assert line["tokenizer_id"] == VisionTokenizer.load(tmp_path / "tok").identity()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), "--tokenizer", str(tmp_path / "tok")])
    assert "does not exist" in capsys.readouterr().err
