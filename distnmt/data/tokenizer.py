"""Sentencepiece subword models: training and a small picklable wrapper.

The special ids are fixed project-wide (PAD 0, UNK 1, BOS 2, EOS 3) so the model,
the batcher and beam search can use them as constants; a model file trained with
other ids is rejected when loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from distnmt.data.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# The trainer records its thread count in the model file. Pinning it (to
# sentencepiece's own default) keeps the file bytes, and so Tokenizer.sha256,
# identical on every machine; the learnt pieces do not depend on it anyway.
_TRAIN_THREADS = 16


class _ErrorCapturingIterator:
    """Feeds sentences to the sentencepiece trainer and keeps any exception raised.

    Sentencepiece re-raises an iterator's exception as a RuntimeError with a
    multi-line message; keeping the original lets us re-raise e.g. a DataError
    that names the bad file and line.
    """

    def __init__(self, sentences: Iterable[str]) -> None:
        self._it = iter(sentences)
        self.error: BaseException | None = None
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            sentence = next(self._it)
        except StopIteration:
            raise
        except BaseException as exc:
            self.error = exc
            raise
        self.count += 1
        return sentence


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def train_sentencepiece(
    sentences: Iterable[str],
    model_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
) -> Path:
    """Train a sentencepiece model on ``sentences``; write ``{prefix}.model`` and ``{prefix}.vocab``.

    Deterministic: the same sentences and arguments give a byte-identical .model
    file. When there are more than ``input_sentence_size`` sentences, sentencepiece
    samples that many with its RNG, which ``seed`` fixes. Returns the .model path.
    """
    model_prefix = Path(model_prefix)
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    vocab_path = model_prefix.with_name(model_prefix.name + ".vocab")
    feed = _ErrorCapturingIterator(sentences)
    model = _BytesSink()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=feed,
            model_writer=model,  # in memory: a model_prefix would be recorded in the file
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=_TRAIN_THREADS,
            minloglevel=2,  # its INFO log is hundreds of lines per model
        )
    except RuntimeError as exc:
        if feed.error is not None:
            raise feed.error from None
        reason = " ".join(str(exc).split())
        raise DataError.at(model_path, None, f"sentencepiece training failed: {reason}") from None
    if feed.error is not None:
        raise feed.error
    if not model.data:
        raise DataError.at(model_path, None, f"sentencepiece produced no model from {feed.count} sentences")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(model_path, model.data)
    _write_vocab(Tokenizer(model_path), vocab_path)
    return model_path


class _BytesSink:
    """The ``model_writer`` sentencepiece writes the serialized model into."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _write_vocab(tok: "Tokenizer", vocab_path: Path) -> None:
    """Human-readable ``piece<TAB>score`` list, as spm_train writes it."""
    sp = tok._sp
    lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())]
    tmp = vocab_path.with_name(vocab_path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, vocab_path)


class Tokenizer:
    """A loaded sentencepiece model with the project's fixed special ids.

    Picklable by value (the model bytes travel with it), so Ray can ship it to
    workers that do not share a filesystem with the driver.
    """

    vocab_size: int
    sha256: str

    def __init__(self, model_path: Path, num_threads: int | None = None) -> None:
        self.model_path = Path(model_path)
        try:
            data = self.model_path.read_bytes()
        except FileNotFoundError:
            raise DataError.at(self.model_path, None, "sentencepiece model not found") from None
        self._load(data, num_threads)

    def _load(self, data: bytes, num_threads: int | None) -> None:
        self._model_bytes = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        # Threads for batch encoding; -1 lets sentencepiece use every core.
        self.num_threads = -1 if num_threads is None else num_threads
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as exc:
            reason = " ".join(str(exc).split())
            raise DataError.at(self.model_path, None, f"not a sentencepiece model ({reason})") from None
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise DataError.at(
                self.model_path, None,
                f"special ids (pad, unk, bos, eos) are {ids}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}",
            )
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text``, without BOS/EOS (the batcher adds them)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on sentencepiece's own thread pool."""
        return self._sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenized text; PAD/BOS/EOS are dropped (UNK decodes as sentencepiece's " ⁇ ")."""
        specials = (PAD_ID, BOS_ID, EOS_ID)
        return self._sp.decode([int(i) for i in ids if int(i) not in specials])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self) -> dict[str, Any]:
        return {"model_path": str(self.model_path), "model": self._model_bytes, "num_threads": self.num_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_path = Path(state["model_path"])
        self._load(state["model"], state["num_threads"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
