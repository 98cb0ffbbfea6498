"""The text tokenizer: the shipped BPE, its corpus, rebuilding it, and loading a local HF tokenizer."""

from __future__ import annotations

import pytest

import envs
from emu_world.models.text_tokenizer import (
    SHIPPED_PATH, BpeTrainConfig, load_text_tokenizer, main, project_corpus, train_bpe,
)


@pytest.fixture(scope="module")
def shipped():
    return load_text_tokenizer()


def test_shipped_file_is_small_package_data(shipped):
    assert SHIPPED_PATH.is_file() and SHIPPED_PATH.stat().st_size < 100_000
    assert 256 < shipped.vocab_size <= BpeTrainConfig.vocab_size
    assert shipped.source == "shipped"


def test_corpus_covers_every_env_text():
    corpus = set(project_corpus())
    for spec in envs.TASKS.values():
        env_cls = spec.env_cls()
        assert env_cls.task in corpus
        assert set(env_cls.subtasks) <= corpus
        assert set(getattr(env_cls, "commands", ())) <= corpus
    assert {"8*8", "16*16", "4*4"} <= corpus


def test_shipped_file_is_up_to_date_with_the_corpus(shipped):
    # if this fails after editing an env's task/subtask text: python -m emu_world.models.text_tokenizer
    assert train_bpe(project_corpus()).identity == shipped.identity


def test_project_text_round_trips_compactly(shipped):
    for text in project_corpus():
        ids = shipped.encode(text)
        assert ids and all(0 <= i < shipped.vocab_size for i in ids)
        assert shipped.decode(ids) == text
        assert len(ids) <= max(3, len(text.split()) + 2)  # whole words: the BPE learnt the project text
    assert len(shipped.encode("16*16")) <= 3


def test_unseen_text_falls_back_to_bytes(shipped):
    for text in ["stack the green mug on the plate", "  Ümlaut, 中文, 🙂\n\ttabs", ""]:
        assert shipped.decode(shipped.encode(text)) == text


def test_rebuild_cli_and_loading_a_file(tmp_path):
    out = tmp_path / "tok.json"
    extra = tmp_path / "extra.txt"
    extra.write_text("stack the green mug\nstack the green mug\n")
    main(["--out", str(out), "--extra", str(extra)])
    tok = load_text_tokenizer(out)
    assert tok.source == str(out)
    assert len(tok.encode("stack the green mug")) <= 4
    assert tok.decode(tok.encode("turn left")) == "turn left"


def test_local_hugging_face_folder_loads_offline(tmp_path, shipped):
    # stands in for a Qwen checkpoint folder: AutoTokenizer.from_pretrained(path, local_files_only=True)
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=shipped.backend).save_pretrained(tmp_path / "qwen")
    tok = load_text_tokenizer(tmp_path / "qwen")
    text = "lift the cube with the left gripper"
    assert tok.encode(text) == shipped.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == shipped.vocab_size


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="byte alphabet"):
        BpeTrainConfig(vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_bpe([])
