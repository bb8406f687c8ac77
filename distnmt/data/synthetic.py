"""A synthetic parallel corpus whose translation is known exactly: the paper's claim in miniature.

The target of a source sentence is a fixed function of it that needs alignment:
every source word is replaced by its word in a fixed bilingual dictionary (a
bijection between two invented vocabularies), and the order is changed by
reversing each group of ``group`` consecutive words (``group=0``: the whole
sentence is reversed). For ``group=3``::

    source: dak mif tol pes run    ->    target: TOL MIF DAK RUN PES  (in the target's own words)

A model must therefore know, at each output position, which source word it
translates: RNNsearch can look it up with its alignment model, RNNencdec must
carry the whole sentence in one vector, and so degrades as sentences get longer,
as in Figure 2 of Bahdanau et al. (2014). Dev and test source lengths are drawn
uniformly from ``min_words``..``max_words``, so every length bin of that figure is
filled as much as the others. Training lengths are log-uniform by default (as many
sentences of 3-6 words as of 35-70; mean 21 words for 3-70): like a real corpus,
most sentences are short, which makes a training step cheaper on average and lets
the alignment be learnt on short sentences first.

The files are plain text in the layout ``distnmt prepare`` reads without a
preset (``train/train.<lang>``, ``dev/dev.<lang>``, ``test/test.<lang>``), so
the corpus goes through the normal path: cleaning, sentencepiece, shards; the
same seed writes the same bytes.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distnmt.io import write_json, write_text

if TYPE_CHECKING:
    from distnmt.config import DataConfig

__all__ = ["SyntheticTask", "translate", "write_corpus", "CORPUS_FILE"]

CORPUS_FILE = "synthetic.json"  # the task's parameters, beside the text files
_SRC_LETTERS = "bdfgklmnprst"  # consonants; vowels between them keep the words pronounceable
_TGT_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"
_VOWELS_SRC = "aeiou"
_VOWELS_TGT = "AEIOUY"


@dataclass(frozen=True)
class SyntheticTask:
    """What to generate. The defaults are the ``distnmt bench claim`` task.

    Args:
        words: distinct words per language (the dictionary's size).
        min_words, max_words: source length range in words, drawn uniformly.
        group: reverse each run of this many consecutive words (0: the whole sentence).
        train_pairs, dev_pairs, test_pairs: sentences per split.
        seed: the same seed gives the same dictionary and the same sentences.
        src_lang, tgt_lang: file suffixes (``data.src_lang`` / ``data.tgt_lang``).
        log_lengths: training lengths log-uniform (1, default) or uniform (0) in the range.
    """

    words: int = 40
    min_words: int = 3
    max_words: int = 70
    group: int = 3
    train_pairs: int = 20000
    dev_pairs: int = 400
    test_pairs: int = 700
    seed: int = 1
    src_lang: str = "src"
    tgt_lang: str = "tgt"
    log_lengths: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.words >= 2, f"words must be at least 2, got {self.words}"),
            (1 <= self.min_words <= self.max_words, f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}"),
            (self.group >= 0, f"group must be >= 0 (0: reverse the whole sentence), got {self.group}"),
            (min(self.train_pairs, self.dev_pairs, self.test_pairs) >= 1, "every split needs at least one pair"),
            (self.src_lang != self.tgt_lang, f"src_lang and tgt_lang are both {self.src_lang!r}"),
            (self.words <= len(_SRC_LETTERS) ** 2 * len(_VOWELS_SRC), f"at most {len(_SRC_LETTERS) ** 2 * len(_VOWELS_SRC)} words"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"synthetic task: {message}")


def _vocabulary(rng: random.Random, n: int, consonants: str, vowels: str) -> list[str]:
    """``n`` distinct consonant-vowel-consonant words, in a random order."""
    every = [a + v + b for a in consonants for v in vowels for b in consonants]
    return rng.sample(every, n)


def translate(words: list[str], dictionary: dict[str, str], group: int) -> list[str]:
    """The reference translation: each word through ``dictionary``, each group of ``group`` reversed."""
    out = [dictionary[w] for w in words]
    if group == 0:
        return out[::-1]
    return [w for start in range(0, len(out), group) for w in reversed(out[start:start + group])]


def _length(rng: random.Random, low: int, high: int, log: bool) -> int:
    """Uniform in low..high, or log-uniform: floor(exp(U(ln low, ln(high + 1))))."""
    if not log:
        return rng.randint(low, high)
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


def _sentences(rng: random.Random, task: SyntheticTask, src_words: list[str], count: int,
               log: bool = False) -> list[list[str]]:
    return [[rng.choice(src_words) for _ in range(_length(rng, task.min_words, task.max_words, log))]
            for _ in range(count)]


def write_corpus(task: SyntheticTask, root: Path) -> dict[str, Path]:
    """Write train/dev/test under ``root`` (plain text, one sentence per line).

    Returns the prefixes for the config: ``train_prefix``, ``dev_prefix`` and the
    test ``test_src`` / ``test_ref`` paths, relative to ``root`` (= data.source_dir).
    Dev and test sentences are drawn after training's, from the same distribution
    (with 40 words a repeat of a 3-word training sentence is possible, a longer one is not).
    """
    rng = random.Random(task.seed)
    src_words = _vocabulary(rng, task.words, _SRC_LETTERS, _VOWELS_SRC)
    tgt_words = _vocabulary(rng, task.words, _TGT_LETTERS, _VOWELS_TGT)
    dictionary = dict(zip(src_words, tgt_words))
    root = Path(root)
    names = {"train": task.train_pairs, "dev": task.dev_pairs, "test": task.test_pairs}
    for split, count in names.items():
        sources = _sentences(rng, task, src_words, count, log=split == "train" and bool(task.log_lengths))
        write_text(root / split / f"{split}.{task.src_lang}", "".join(" ".join(s) + "\n" for s in sources))
        write_text(root / split / f"{split}.{task.tgt_lang}",
                   "".join(" ".join(translate(s, dictionary, task.group)) + "\n" for s in sources))
    write_json(root / CORPUS_FILE, {"task": asdict(task), "dictionary": dictionary})
    return {
        "train_prefix": Path("train/train"), "dev_prefix": Path("dev/dev"),
        "test_src": Path(f"test/test.{task.src_lang}"), "test_ref": Path(f"test/test.{task.tgt_lang}"),
    }


def write_for_config(data: "DataConfig", fields: dict[str, int]) -> SyntheticTask:
    """Write the task (``fields`` override SyntheticTask's defaults) into ``data.source_dir``,
    where ``data``'s prefixes must read it (as configs/claim.yaml does); prepare then runs
    on it as on any corpus. Mistakes are one-line ConfigErrors naming the key."""
    from distnmt.config import ConfigError  # config sits below data; imported late to keep this module light

    if data.source_dir is None or data.preset is not None or data.parts is not None or data.dev_sets or data.test_set:
        raise ConfigError("--synthetic: needs data.source_dir (where to write) and no data.preset, parts, dev_sets "
                          "or test_set (see configs/claim.yaml)")
    try:
        task = SyntheticTask(**fields, src_lang=data.src_lang, tgt_lang=data.tgt_lang)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--synthetic: {err}") from None
    written = write_corpus(task, Path(data.source_dir))
    for key, rel in written.items():
        if getattr(data, key) != str(rel):
            raise ConfigError(f"data.{key}: {getattr(data, key)!r} but --synthetic writes {str(rel)!r}")
    return task
