"""Corpus-level scores with sacreBLEU: BLEU and chrF, each with its signature.

The signature (tokenizer, smoothing, version...) is kept beside every score so
that figures from different runs are only compared when they are comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass
class Scores:
    """BLEU and chrF of one system output against one reference set."""

    bleu: float
    chrf: float
    bleu_line: str  # sacreBLEU's own one-line report, signature included
    bleu_signature: str
    chrf_signature: str
    sentences: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def score_corpus(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> Scores:
    """Detokenized hypotheses vs raw references (sacreBLEU's defaults: exp smoothing; BLEU's
    ``tokenize`` is eval.bleu_tokenize, e.g. zh or ja-mecab for such targets, and in the signature)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu_metric, chrf_metric = BLEU(tokenize=tokenize), CHRF()
    bleu = bleu_metric.corpus_score(hypotheses, [references])
    chrf = chrf_metric.corpus_score(hypotheses, [references])
    return Scores(
        bleu=bleu.score,
        chrf=chrf.score,
        bleu_line=bleu.format(signature=str(bleu_metric.get_signature())),
        bleu_signature=str(bleu_metric.get_signature()),
        chrf_signature=str(chrf_metric.get_signature()),
        sentences=len(hypotheses),
    )
