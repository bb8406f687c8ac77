"""Scoring one checkpoint on one split: translator + split -> :class:`ScoreRecord`.

The one scoring path, with no Ray and no actor: ``distnmt evaluate`` calls it
directly, the evaluator actor calls it for each checkpoint it decides to score.

- :func:`score`: decode the split (beam search), sacreBLEU BLEU and chrF against
  the raw references, and the teacher-forced dev cross-entropy per target subword;
  touches no file.
- :func:`evaluate_checkpoint`: the same for a checkpoint directory, with the
  hypotheses written and the record persisted in a :class:`RecordStore`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from distnmt.checkpoint import read_meta
from distnmt.config import Config, EvalConfig
from distnmt.data.batch import collate
from distnmt.data.custom import own_split_name
from distnmt.data.prepared import PreparedData
from distnmt.data.tokenizer import PAD_ID
from distnmt.evaluate.records import DECODE_KEYS, RecordStore, ScoreRecord, lag_between
from distnmt.evaluate.scoring import score_corpus
from distnmt.evaluate.translator import Translator, translator_from_checkpoint

# Seconds to wait before each decode. A test seam, not a setting: the tiny models of
# the tests decode in a fraction of a second, and the tests need an evaluator that
# falls behind training (policy "newest") or can be caught mid-decode (restart).
SLOWDOWN_ENV = "DISTNMT_EVAL_SLOWDOWN_S"
# Logits held at once by the cross-entropy pass (sentences x target length x vocabulary):
# 2^24 floats = 64 MiB, whatever eval.batch_sentences and the vocabulary are.
XENT_LOGITS_BUDGET = 1 << 24


@dataclass
class EvalSplit:
    """One evaluation split held in memory: raw sources and references."""

    name: str  # "dev" or "test"
    test_set: str  # e.g. "newstest2013"
    sources: list[str]
    references: list[str]


@dataclass
class Scored:
    """A score and the hypotheses it was computed from (for the .hyp file and W&B samples)."""

    record: ScoreRecord
    hypotheses: list[str]


def eval_set_name(path_or_prefix: str) -> str:
    """'dev/newstest2013' -> 'newstest2013'; 'test/newstest2014-fren-src.en.sgm' -> 'newstest2014'."""
    found = re.search(r"newstest\d{4}", path_or_prefix)
    return found.group(0) if found else Path(path_or_prefix).name.split(".")[0]


def load_split(prepared: PreparedData, cfg: Config, split: str) -> EvalSplit:
    """The split's raw text from the prepared data (first ``eval.max_sentences`` lines)."""
    sources, references = prepared.eval_text(split)
    limit = cfg.eval.max_sentences
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    own = cfg.data.dev if split == "dev" else cfg.data.test  # a user's own files
    name = (own_split_name(own) if own is not None
            else eval_set_name(cfg.data.dev_prefix if split == "dev" else cfg.data.test_src))
    return EvalSplit(split, name, sources, references)


def decode_settings(eval_cfg: EvalConfig, sentences: int) -> dict[str, object]:
    """What a score depends on besides the checkpoint: a persisted score is reused only when all match."""
    return {**{key: getattr(eval_cfg, key) for key in DECODE_KEYS}, "sentences": sentences}


def cross_entropy(translator: Translator, sources: list[str], references: list[str]) -> tuple[float, int]:
    """Teacher-forced cross-entropy of the references: (nats summed over target subwords, their count).

    As in training (data/batch.py): the decoder reads BOS + y and is scored on y + EOS,
    so EOS counts as one subword per sentence. Sources are not truncated (the encoder
    takes any length) and nothing is smoothed: it is the plain negative log-likelihood
    of the same sentences under the same target sentencepiece model, comparable with
    any system whose softmax covers the same subwords.
    """
    src_ids = translator.src_tok.encode_batch(sources)
    tgt_ids = translator.tgt_tok.encode_batch(references)
    vocab = translator.tgt_tok.vocab_size
    # Longest targets first, so each batch pads little and the first batch sizes the peak.
    order = sorted(range(len(tgt_ids)), key=lambda i: len(tgt_ids[i]), reverse=True)
    model = translator.model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    start = 0
    with torch.inference_mode():
        while start < len(order):
            longest = len(tgt_ids[order[start]]) + 1
            size = max(1, min(translator.eval_cfg.batch_sentences, XENT_LOGITS_BUDGET // (longest * vocab)))
            chunk = order[start:start + size]
            start += size
            batch = collate(src_ids, tgt_ids, chunk).to(translator.device)  # lists index like TokenArrays
            logits = model(batch.src, batch.src_lengths, batch.tgt_in)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.tgt_out.reshape(-1),
                                     ignore_index=PAD_ID, reduction="sum").double().cpu()
            tokens += batch.num_target_tokens()
    return float(total), tokens


def score(translator: Translator, data: EvalSplit, checkpoint: str, step: int, origin: str) -> Scored:
    """Decode ``data`` with ``translator``, score it with sacreBLEU, and measure its cross-entropy.

    Touches no file and no actor: the caller names, persists and logs the record.
    ``checkpoint``/``step``/``origin`` only label it.
    """
    started, cpu_started = time.time(), time.process_time()
    hypotheses = translator.translate(data.sources)
    decoded, cpu_decoded = time.time(), time.process_time()
    scores = score_corpus(hypotheses, data.references, translator.eval_cfg.bleu_tokenize)
    nats, tokens = cross_entropy(translator, data.sources, data.references)
    decode_seconds = decoded - started
    record = ScoreRecord(
        checkpoint=checkpoint, step=step, split=data.name, test_set=data.test_set, origin=origin,
        bleu=scores.bleu, chrf=scores.chrf, bleu_line=scores.bleu_line, bleu_signature=scores.bleu_signature,
        chrf_signature=scores.chrf_signature, sentences=scores.sentences,
        **{key: getattr(translator.eval_cfg, key) for key in DECODE_KEYS},
        xent=round(nats / tokens, 6) if tokens else None, xent_tokens=tokens,
        xent_seconds=round(time.time() - decoded, 2),
        decode_seconds=round(decode_seconds, 2),
        decode_cpu_seconds=round(cpu_decoded - cpu_started, 2),
        sentences_per_s=round(len(hypotheses) / max(decode_seconds, 1e-9), 2),
        started_at=started, scored_at=time.time(), evaluator_pid=os.getpid(),
    )
    return Scored(record, hypotheses)


def hyp_file_name(record: ScoreRecord) -> str:
    """``<split>.<checkpoint>.hyp``; `distnmt evaluate` may use other settings than the run, so its
    file also says which (``.beam<B>.n<N>``)."""
    suffix = f".beam{record.beam_size}.n{record.sentences}" if record.origin == "evaluate" else ""
    return f"{record.split}.{record.checkpoint}{suffix}.hyp"


def evaluate_checkpoint(path: Path, name: str, data: EvalSplit, eval_cfg: EvalConfig, store: RecordStore,
                        origin: str, device: str = "cpu", storage_path: Optional[str] = None,
                        reported_at: Optional[float] = None, handed_at: Optional[float] = None) -> Scored:
    """Score the checkpoint directory ``path`` (called ``name`` in its run), write its hypotheses
    beside ``store``'s records and persist the record; returns it with the hypotheses.

    No vocabulary check against the prepared data: the checkpoint carries its own
    sentencepiece models and is scored on raw text, so any prepared copy of the split
    will do. ``reported_at`` (training scores): when the checkpoint was reported; the
    record's ``lag_seconds`` runs from then to the score.
    """
    time.sleep(float(os.environ.get(SLOWDOWN_ENV, "0")))
    meta = read_meta(path)
    loading = time.time()
    translator = translator_from_checkpoint(path, eval_cfg, device=device)
    load_seconds = round(time.time() - loading, 2)
    scored = score(translator, data, name, int(meta["step"]), origin)
    record = scored.record
    record.load_seconds = load_seconds
    record.averaged_from = meta.get("averaged_from")
    record.path = storage_path or str(path)
    record.reported_at, record.handed_at = reported_at, handed_at
    record.lag_seconds = lag_between(reported_at, record.scored_at)
    record.hyp_file = store.write_hypotheses(hyp_file_name(record), scored.hypotheses)
    store.add_score(record)
    return scored
