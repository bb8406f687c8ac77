"""What a score is, and where the evaluator keeps it: append-only JSONL under ``<run_dir>/eval``.

A :class:`ScoreRecord` is one checkpoint scored on one split with one set of
decoding settings; a :class:`SkipRecord` is a checkpoint the "newest" policy
chose not to score. Every reader (the actor, ``distnmt evaluate``, the driver's
summary, W&B, the benchmarks) reads these typed fields, never dict keys.

``<split>.jsonl`` holds one line per scored checkpoint, ``<split>.skipped.jsonl``
one per skipped one. Each line is written and fsync'ed before the score is handed
back to Ray, so an evaluator that dies and is restarted reads back everything it
ever reported; a line cut short by a crash mid-write is ignored (that checkpoint
is simply scored again). Lines written by older versions (fewer keys) still load:
every field they may lack has a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from distnmt.io import append_line, write_text

SPLITS = ("dev", "test")
# Decoding settings a score depends on (and eval.bleu_tokenize, issue 17): a record is
# reused only when all match.
DECODE_KEYS = ("beam_size", "alpha", "max_len_a", "max_len_b", "bleu_tokenize")
# Who asked for a score: the training hook, the end of the run, or `distnmt evaluate`.
ORIGINS = ("training", "final", "evaluate")


@dataclass
class ScoreRecord:
    """One checkpoint's score on one split (one line of ``eval/<split>.jsonl``)."""

    checkpoint: str  # the checkpoint directory's name, e.g. "checkpoint_00000240"
    step: int
    split: str  # "dev" or "test"
    test_set: str  # e.g. "newstest2013"
    bleu: float
    chrf: float
    bleu_line: str  # sacreBLEU's own one-line report, signature included
    bleu_signature: str
    chrf_signature: str
    sentences: int  # sentences scored (the first ``eval.max_sentences`` of the split)
    origin: str = "training"  # one of ORIGINS; lines older than the field are training scores
    # Decoding settings (None: a line older than the field, which matches any value).
    beam_size: Optional[int] = None
    alpha: Optional[float] = None
    max_len_a: Optional[float] = None
    max_len_b: Optional[int] = None
    bleu_tokenize: Optional[str] = None  # sacreBLEU's tokenizer (also in bleu_signature)
    # Teacher-forced cross-entropy (nats) per target subword, EOS included, over the
    # same sentences: comparable across systems with the same target sentencepiece model
    # long before BLEU moves. None on lines older than the field.
    xent: Optional[float] = None
    xent_tokens: Optional[int] = None  # the target subwords (EOS included) it averages over
    xent_seconds: Optional[float] = None
    hyp_file: str = ""  # the detokenized output, in the same directory as the JSONL
    load_seconds: Optional[float] = None
    decode_seconds: Optional[float] = None
    decode_cpu_seconds: Optional[float] = None  # CPU time too: on a shared machine wall time says more about the neighbours
    sentences_per_s: Optional[float] = None
    started_at: Optional[float] = None  # decoding began (Unix time)
    scored_at: Optional[float] = None  # the score was computed
    evaluator_pid: Optional[int] = None
    path: Optional[str] = None  # where the checkpoint is (its storage path for training scores)
    # Training scores only: when the checkpoint was reported (its meta.json landed in
    # storage), when the hook handed it over, and how long after the report the score
    # reached training: the evaluator's lag.
    reported_at: Optional[float] = None
    handed_at: Optional[float] = None
    lag_seconds: Optional[float] = None
    averaged_from: Optional[list[str]] = None  # an averaged checkpoint: the checkpoints it averages
    # Set when an earlier score (of this origin) was handed to training again instead of
    # decoding anew: its timings are that earlier decode's, its lag this report's.
    reused_from: Optional[str] = None

    def settings(self) -> dict[str, Any]:
        """The decoding settings and sentence count this score depends on."""
        return {**{key: getattr(self, key) for key in DECODE_KEYS}, "sentences": self.sentences}

    def matches(self, settings: dict[str, Any]) -> bool:
        """Made with ``settings`` (a setting missing from an older line does not disqualify it)."""
        mine = self.settings()
        return all(mine.get(key) is None or mine[key] == value for key, value in settings.items())

    def for_report(self, reported_at: Optional[float], handed_at: Optional[float], now: float) -> "ScoreRecord":
        """This score handed to training for a report at ``reported_at``: a training score whose
        lag is from that report to ``now``, when training gets it (never the earlier decode's)."""
        return dataclasses.replace(
            self, origin="training", reported_at=reported_at, handed_at=handed_at,
            lag_seconds=lag_between(reported_at, now), reused_from=self.origin,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoreRecord":
        return _from_dict(cls, data)


@dataclass
class SkipRecord:
    """A checkpoint the "newest" policy did not score (one line of ``eval/<split>.skipped.jsonl``)."""

    checkpoint: str
    step: int
    split: str
    newer: str  # the newer checkpoint that made this one not worth scoring
    policy: str = "newest"
    reported_at: Optional[float] = None
    skipped_at: Optional[float] = None
    path: Optional[str] = None
    evaluator_pid: Optional[int] = None
    skipped: bool = True  # in the JSON too, so that a reader of the line alone can tell

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkipRecord":
        return _from_dict(cls, data)


@dataclass
class FinalReport:
    """The end of a run (``eval/final.json``): the best checkpoint, its test score, why training ended."""

    best: Optional[ScoreRecord] = None  # by dev BLEU among the training scores; the earliest on a tie
    test: Optional[ScoreRecord] = None  # the best checkpoint on the test set (eval.test_at_end)
    figures: list[str] = dataclasses.field(default_factory=list)  # relative to the run directory
    stop_reason: Optional[str] = None  # the early-stopping reason training was given, if any
    skipped: list[str] = dataclasses.field(default_factory=list)  # checkpoints the "newest" policy skipped
    lag_seconds: Optional[dict[str, float]] = None  # mean/max/checkpoints of the stored lags

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinalReport":
        data = dict(data)
        for key in ("best", "test"):
            if data.get(key) is not None:
                data[key] = ScoreRecord.from_dict(data[key])
        return _from_dict(cls, data)


Record = Union[ScoreRecord, SkipRecord]
_R = TypeVar("_R", ScoreRecord, SkipRecord, FinalReport)


def _from_dict(cls: type[_R], data: dict[str, Any]) -> _R:
    """Keys this version does not know (a newer writer's) are ignored; a missing required one is a TypeError."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in data.items() if key in known})


def lag_between(reported_at: Optional[float], scored_at: Optional[float]) -> Optional[float]:
    """Seconds from a checkpoint's report to its score (None when either time is unknown)."""
    if reported_at is None or scored_at is None:
        return None
    return round(scored_at - reported_at, 2)


class RecordStore:
    """Scored and skipped checkpoints of one run, in memory and on disk."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.scored: list[ScoreRecord] = []
        self.skipped: list[SkipRecord] = []
        for split in SPLITS:
            self.scored += read_scores(self.scores_path(split))
            self.skipped += read_skips(self.skipped_path(split))

    def scores_path(self, split: str) -> Path:
        return self.out_dir / f"{split}.jsonl"

    def skipped_path(self, split: str) -> Path:
        return self.out_dir / f"{split}.skipped.jsonl"

    def add_score(self, record: ScoreRecord) -> None:
        append_line(self.scores_path(record.split), json.dumps(record.to_dict()))
        self.scored.append(record)

    def add_skip(self, record: SkipRecord) -> None:
        append_line(self.skipped_path(record.split), json.dumps(record.to_dict()))
        self.skipped.append(record)

    def find(self, split: str, checkpoint: str, settings: dict[str, Any]) -> Optional[ScoreRecord]:
        """The latest persisted score of ``checkpoint`` on ``split`` made with ``settings``.

        The latest: a score re-issued to training (:meth:`ScoreRecord.for_report`) is
        appended after the one it re-issues and is the one that counts from then on.
        """
        for record in reversed(self.scored):
            if record.split == split and record.checkpoint == checkpoint and record.matches(settings):
                return record
        return None

    def find_skip(self, split: str, checkpoint: str) -> Optional[SkipRecord]:
        return next((r for r in self.skipped if r.split == split and r.checkpoint == checkpoint), None)

    def training_scores(self, split: str, settings: dict[str, Any]) -> list[ScoreRecord]:
        """Scores of reported checkpoints on ``split`` with ``settings``, one per checkpoint, in step order."""
        latest: dict[str, ScoreRecord] = {}
        for record in self.scored:
            if record.split == split and record.origin == "training" and record.matches(settings):
                latest[record.checkpoint] = record
        return sorted(latest.values(), key=lambda r: r.step)

    def write_hypotheses(self, name: str, hypotheses: list[str]) -> str:
        """Write one output line per source line as ``eval/<name>``; returns the file name."""
        write_text(self.out_dir / name, "".join(h + "\n" for h in hypotheses))
        return name


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a crash mid-write; that checkpoint is rescored
        if isinstance(record, dict):
            records.append(record)
    return records


def read_scores(path: Path) -> list[ScoreRecord]:
    """The score records of ``path`` (a line missing a required field is skipped like a cut one)."""
    return _typed(ScoreRecord, read_jsonl(path))


def read_skips(path: Path) -> list[SkipRecord]:
    return _typed(SkipRecord, read_jsonl(path))


def _typed(cls: type[_R], rows: list[dict[str, Any]]) -> list[_R]:
    out = []
    for row in rows:
        try:
            out.append(cls.from_dict(row))
        except TypeError:
            continue  # not a record of this kind (a required field is missing)
    return out
