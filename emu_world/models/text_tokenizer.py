"""Text tokens of the world model: a small byte-level BPE trained on the project's own text.

    text = load_text_tokenizer()                    # the shipped BPE (emu_world/assets/text_tokenizer.json)
    text = load_text_tokenizer("/models/Qwen3-0.6B")  # or a Hugging Face tokenizer folder, offline
    ids = text.encode("lift the cube")              # list[int], every id in [0, text.vocab_size)
    text.decode(ids) == "lift the cube"             # byte-level: exact for any string

    python -m emu_world.models.text_tokenizer              # rebuild the shipped file after editing env texts

The corpus (:func:`project_corpus`) is every registered env's instruction (``task``), its subtask
texts and, for exploration envs, the command names, plus the image meta strings ``"{h}*{w}"``
that :mod:`emu_world.models.layout` writes in front of every image. Byte-level BPE keeps any other
string encodable (unknown words fall back to bytes), so a new instruction never fails to
tokenize; it only costs more tokens until the file is rebuilt.

No special tokens live here: BOS/EOS/SOV/... are ids of :class:`emu_world.models.layout.SequenceLayout`,
placed after the text range, so the same layout works with this BPE or with a Qwen tokenizer
(whose own specials are simply never emitted).

References and departures: Emu3/Emu3.5 reuse the Qwen tokenizer (151k tokens); at laptop scale
such an embedding table would dwarf the model, so the default is a BPE of a few hundred tokens
trained with the ``tokenizers`` library, and a Qwen tokenizer from a local folder is an option.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SHIPPED_PATH = Path(__file__).resolve().parent.parent / "assets" / "text_tokenizer.json"
GRID_SIDES = range(1, 33)  # image meta "h*w" strings for every grid up to 32x32 go into the corpus


@dataclass
class BpeTrainConfig:
    """How the shipped BPE is trained (``python -m emu_world.models.text_tokenizer --help``)."""

    vocab_size: int = 1024  # upper bound: on the small project corpus training stops earlier
    min_frequency: int = 1

    def __post_init__(self) -> None:
        if self.vocab_size < 257:
            raise ValueError(
                f"BPE vocab_size={self.vocab_size} is too small: the byte alphabet alone takes 256 tokens"
            )
        if self.min_frequency < 1:
            raise ValueError(f"BPE min_frequency must be >= 1, got {self.min_frequency}")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` seen as text <-> ids in ``[0, vocab_size)``, nothing else.

    ``source`` says where it came from (a file or folder path, or ``"shipped"``); ``identity``
    is a hash of its full definition, which checkpoints record so a model is never paired with
    a different text vocabulary.
    """

    def __init__(self, backend: Tokenizer, source: str):
        self.backend = backend
        self.source = source
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.identity = hashlib.sha1(backend.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer(source={self.source!r}, vocab_size={self.vocab_size}, identity={self.identity})"


def project_corpus(extra: Iterable[str] = ()) -> list[str]:
    """The project's own text: env instructions, subtasks, exploration commands, grid meta strings."""
    import envs  # local: importing envs registers the gymnasium ids

    corpus: list[str] = []
    for spec in envs.TASKS.values():
        env_cls = spec.env_cls()
        corpus.append(env_cls.task)
        corpus.extend(env_cls.subtasks)
        corpus.extend(getattr(env_cls, "commands", ()))
    corpus.extend(f"{h}*{w}" for h in GRID_SIDES for w in GRID_SIDES)
    corpus.extend(extra)
    return corpus


def train_bpe(corpus: Sequence[str], config: BpeTrainConfig | None = None) -> TextTokenizer:
    """Train a byte-level BPE (no normaliser, no prefix space: decode(encode(s)) == s)."""
    config = config or BpeTrainConfig()
    if not corpus:
        raise ValueError("train_bpe: the corpus is empty")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    return TextTokenizer(backend, source="trained")


def build_shipped(path: Path = SHIPPED_PATH, config: BpeTrainConfig | None = None,
                  extra: Iterable[str] = ()) -> TextTokenizer:
    """(Re)train the BPE on :func:`project_corpus` and write it to ``path``."""
    tokenizer = train_bpe(project_corpus(extra), config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(path), pretty=True)
    tokenizer.source = str(path)
    return tokenizer


def load_text_tokenizer(path: str | Path | None = None) -> TextTokenizer:
    """The shipped BPE (``path=None``), a ``tokenizer.json`` file, or a local Hugging Face folder.

    A folder (e.g. a Qwen3 checkpoint's) is opened with ``AutoTokenizer.from_pretrained(path,
    local_files_only=True)``; it must provide a fast tokenizer. Nothing is downloaded.
    """
    if path is None:
        if not SHIPPED_PATH.is_file():
            raise FileNotFoundError(
                f"the shipped text tokenizer {SHIPPED_PATH} is missing; rebuild it with "
                "`python -m emu_world.models.text_tokenizer`"
            )
        return TextTokenizer(Tokenizer.from_file(str(SHIPPED_PATH)), source="shipped")
    path = Path(path)
    if path.is_file():
        return TextTokenizer(Tokenizer.from_file(str(path)), source=str(path))
    if path.is_dir():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not getattr(hf, "is_fast", False):
            raise ValueError(
                f"{path}: {type(hf).__name__} is a slow tokenizer; emu-world needs a fast one "
                "(a folder with tokenizer.json, as Qwen checkpoints ship)"
            )
        return TextTokenizer(hf.backend_tokenizer, source=str(path))
    raise FileNotFoundError(
        f"text tokenizer {path} does not exist: give a tokenizer.json file, a local Hugging Face "
        "tokenizer folder (e.g. a Qwen3 checkpoint), or null for the shipped BPE"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m emu_world.models.text_tokenizer",
        description="Rebuild the shipped byte-level BPE from the project's text (env instructions, "
        "subtasks, exploration commands, grid meta strings).",
    )
    parser.add_argument("--out", type=Path, default=SHIPPED_PATH, help="output tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=BpeTrainConfig.vocab_size)
    parser.add_argument("--extra", type=Path, action="append", default=[],
                        help="a text file whose lines join the corpus (repeatable)")
    args = parser.parse_args(argv)
    extra = [line for f in args.extra for line in f.read_text().splitlines() if line.strip()]
    tokenizer = build_shipped(args.out, BpeTrainConfig(vocab_size=args.vocab_size), extra)
    print(f"wrote {args.out}: {tokenizer.vocab_size} tokens, identity {tokenizer.identity}")


if __name__ == "__main__":
    main()
