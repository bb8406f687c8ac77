"""``PreparedData``: the one owner of the layout ``distnmt prepare`` writes.

Every other module (the training loop, the evaluator, the benchmarks, the CLI and
prepare itself) asks this class for a prepared file instead of spelling its name, so
the layout can change in one place::

    manifest.json                    sizes, vocab hashes, source checksums, exact config;
                                     written last: its presence means "done"
    report.json, report.md           pairs read, kept and dropped per rule, per part
    spm.{lang}.model / .vocab        sentencepiece (the same file twice with a joint vocab)
    train.{lang}.shards.json         shard list of the training token array of {lang}
    shards/{part}-{k}.{lang}.{ids,offsets}.npy   encoded training pairs, one block each
    {dev,test}.{src,tgt}             raw text, unchanged (BLEU is scored on it)
    {dev,test}.{src}.{ids,offsets}.npy  encoded sources
    work/                            intermediate text and stamps of prepare's stages

Opening is cheap (no IO); :attr:`manifest` reads and checks ``manifest.json`` once,
including that the sentencepiece models on disk are the ones it recorded, so a
trainer never pairs token arrays with another vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from distnmt.data.corpus import read_lines
from distnmt.data.errors import DataError
from distnmt.data.shards import TokenArray
from distnmt.data.tokenizer import Tokenizer
from distnmt.io import sha256_file

if TYPE_CHECKING:
    from distnmt.config import DataConfig

MANIFEST_VERSION = 2
_REQUIRED_KEYS = ("version", "src_lang", "tgt_lang", "vocab_size", "max_len", "counts", "dropped", "spm_sha256", "shards")

Split = Literal["dev", "test"]
SPLITS: tuple[Split, ...] = ("dev", "test")


@dataclass
class PreparedData:
    """A prepared-data directory: where each file is, and its checked contents.

    ``src_lang``/``tgt_lang`` are what the caller expects (the config's); when the
    manifest is read they must match what was prepared.
    """

    root: Path
    src_lang: str = "en"
    tgt_lang: str = "fr"
    _manifest: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def from_config(cls, data: "DataConfig") -> "PreparedData":
        """``data.prepared_dir`` for ``data.src_lang`` -> ``data.tgt_lang`` (nothing read yet)."""
        return cls(Path(data.prepared_dir), data.src_lang, data.tgt_lang)

    @classmethod
    def load(cls, root: Union[str, Path]) -> "PreparedData":
        """Open ``root`` with the languages its manifest records; reads and checks the manifest."""
        prepared = cls(Path(root))
        manifest = prepared._read_manifest(check_langs=False)
        prepared.src_lang, prepared.tgt_lang = manifest["src_lang"], manifest["tgt_lang"]
        prepared._manifest = manifest
        return prepared

    @property
    def langs(self) -> tuple[str, str]:
        return self.src_lang, self.tgt_lang

    # ------------------------------------------------------------------ the layout (no IO)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def work_dir(self) -> Path:
        """Intermediate text and stamps; safe to delete (a re-run then redoes that work)."""
        return self.root / "work"

    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    def train_prefix(self, lang: str) -> Path:
        """Prefix of the training token array of ``lang`` (``TokenArray`` opens it)."""
        return self.root / f"train.{lang}"

    def shard_prefix(self, shard: str, lang: str) -> Path:
        """Prefix of one training shard's token array."""
        return self.shard_dir / f"{shard}.{lang}"

    def spm_prefix(self, lang: str) -> Path:
        """What ``train_sentencepiece`` is given: it writes ``{prefix}.model`` and ``.vocab``."""
        return self.root / f"spm.{lang}"

    def spm_model(self, lang: str) -> Path:
        return self.root / f"spm.{lang}.model"

    def spm_vocab(self, lang: str) -> Path:
        return self.root / f"spm.{lang}.vocab"

    def text(self, split: Split, lang: str) -> Path:
        """Raw text of a dev/test side, one segment per line, as in the source files."""
        return self.root / f"{split}.{lang}"

    def source_ids_prefix(self, split: Split) -> Path:
        """Prefix of the encoded source of a dev/test split."""
        return self.root / f"{split}.{self.src_lang}"

    # ------------------------------------------------------------------ contents

    @property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json``, read and checked once (DataError naming the file otherwise)."""
        if self._manifest is None:
            self._manifest = self._read_manifest(check_langs=True)
        return self._manifest

    def check(self) -> "PreparedData":
        """Read and check the manifest now (a clear error before any work starts)."""
        self.manifest  # noqa: B018 - read for its checks
        return self

    @property
    def spm_sha256(self) -> dict[str, str]:
        """sha256 of each language's sentencepiece model, as the manifest recorded it."""
        return dict(self.manifest["spm_sha256"])

    def tokenizer(self, lang: str, num_threads: Optional[int] = None) -> Tokenizer:
        return Tokenizer(self.spm_model(lang), num_threads=num_threads)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        """``{"src": n, "tgt": m}``: the sizes the model's embeddings and output need."""
        return {"src": self.tokenizer(self.src_lang).vocab_size, "tgt": self.tokenizer(self.tgt_lang).vocab_size}

    def train_arrays(self) -> tuple[TokenArray, TokenArray]:
        """Source and target training token arrays (memory-mapped), pair i in both."""
        return TokenArray(self.train_prefix(self.src_lang)), TokenArray(self.train_prefix(self.tgt_lang))

    def source_ids(self, split: Split) -> TokenArray:
        """The encoded source sentences of a dev/test split."""
        return TokenArray(self.source_ids_prefix(split))

    def eval_text(self, split: Split) -> tuple[list[str], list[str]]:
        """(sources, references) of a dev/test split, raw text."""
        return read_lines(self.text(split, self.src_lang)), read_lines(self.text(split, self.tgt_lang))

    # ------------------------------------------------------------------ checking

    def _read_manifest(self, check_langs: bool) -> dict[str, Any]:
        path = self.manifest_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError.at(path, None, "missing; run `distnmt prepare` first") from None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError.at(path, exc.lineno, f"invalid JSON ({exc.msg}); re-run `distnmt prepare`") from None
        if not isinstance(manifest, dict):
            raise DataError.at(path, None, "expected a JSON object")
        if manifest.get("version") != MANIFEST_VERSION:
            raise DataError.at(
                path, None, f"version {manifest.get('version')!r} is not supported (expected {MANIFEST_VERSION}); "
                "re-run `distnmt prepare`"
            )
        for key in _REQUIRED_KEYS:
            if key not in manifest:
                raise DataError.at(path, None, f"missing key {key!r}; re-run `distnmt prepare`")
        if check_langs and (manifest["src_lang"], manifest["tgt_lang"]) != self.langs:
            raise DataError.at(
                path, None, f"prepared for {manifest['src_lang']}->{manifest['tgt_lang']}, not "
                f"{self.src_lang}->{self.tgt_lang} (data.src_lang/data.tgt_lang); re-run `distnmt prepare`"
            )
        for lang in (manifest["src_lang"], manifest["tgt_lang"]):
            model = self.spm_model(lang)
            expected = manifest["spm_sha256"].get(lang)
            try:
                actual = sha256_file(model)
            except FileNotFoundError:
                raise DataError.at(model, None, "missing; re-run `distnmt prepare`") from None
            if actual != expected:
                raise DataError.at(model, None, f"sha256 {actual[:12]}… does not match {path} ({str(expected)[:12]}…)")
        return manifest


def load_manifest(root: Union[str, Path]) -> dict[str, Any]:
    """``PreparedData.load(root).manifest``: the checked manifest of a prepared directory."""
    return PreparedData.load(root).manifest
