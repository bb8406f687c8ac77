"""The paper's figures, as PNG files: BLEU by sentence length and attention heatmaps.

- Figure 2 of Bahdanau et al. (2014): BLEU of the translations grouped by the
  length of the source sentence in words. Long sentences are where RNNsearch
  beats the fixed-vector RNNencdec, so this is the plot to compare runs by.
- Figure 3: the alignment weights alpha_ij of a few sentences, source words on
  the x axis (top), generated words on the y axis, white = weight 1, black = 0.

Drawn with matplotlib's object API on the Agg canvas (no pyplot global state,
no display), so the evaluator's threads can draw safely.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sacrebleu.metrics import BLEU

if TYPE_CHECKING:
    from distnmt.config import EvalConfig
    from distnmt.evaluate.records import ScoreRecord
    from distnmt.evaluate.score import EvalSplit

# Source-length bins in words, as in the paper's Figure 2 (0 to 60+ words).
LENGTH_BIN = 10
LAST_BIN_START = 60
# Attention examples (Figure 3): the first dev sentences of a readable length.
EXAMPLE_WORDS = (10, 25)


@dataclass
class LengthBin:
    """Corpus BLEU of the sentences whose source has ``low``..``high`` words."""

    low: int
    high: int  # inclusive; -1 for the open last bin
    sentences: int
    bleu: float

    @property
    def label(self) -> str:
        return f"{self.low}+" if self.high < 0 else f"{self.low}-{self.high}"


def bleu_by_length(sources: list[str], hypotheses: list[str], references: list[str],
                   width: int = LENGTH_BIN, last_start: int = LAST_BIN_START, tokenize: str = "13a") -> list[LengthBin]:
    """Corpus BLEU per bin of source length (whitespace words); empty bins are left out.
    ``tokenize``: sacreBLEU's tokenizer (eval.bleu_tokenize), as for the run's scores."""
    if not (len(sources) == len(hypotheses) == len(references)):
        raise ValueError(f"{len(sources)} sources, {len(hypotheses)} hypotheses, {len(references)} references")
    groups: dict[int, list[int]] = {}
    for i, source in enumerate(sources):
        words = len(source.split())
        start = min((max(words, 1) - 1) // width * width + 1, last_start)
        groups.setdefault(start, []).append(i)
    bins = []
    for start in sorted(groups):
        index = groups[start]
        score = BLEU(tokenize=tokenize).corpus_score([hypotheses[i] for i in index], [[references[i] for i in index]])
        high = -1 if start >= last_start else start + width - 1
        bins.append(LengthBin(low=start, high=high, sentences=len(index), bleu=score.score))
    return bins


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_bleu_by_length(bins: list[LengthBin], path: Path, title: str) -> Path:
    """The paper's Figure 2 for one system; the numbers are also written as JSON beside the PNG."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    x = [b.low + (LENGTH_BIN - 1) / 2 for b in bins]
    ax.plot(x, [b.bleu for b in bins], marker="o")
    for xi, b in zip(x, bins):
        ax.annotate(f"n={b.sentences}", (xi, b.bleu), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.set_xticks(x, [b.label for b in bins])
    ax.set_xlabel("Sentence length (source words)")
    ax.set_ylabel("BLEU score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(y=0.15)  # room for the n= labels above the points
    _save(fig, path)
    path.with_suffix(".json").write_text(json.dumps([asdict(b) for b in bins], indent=1) + "\n", encoding="utf-8")
    return path


def plot_attention(src_pieces: list[str], tgt_pieces: list[str], weights: np.ndarray, path: Path, title: str) -> Path:
    """The paper's Figure 3: one sentence's alignment matrix in grayscale."""
    if weights.shape != (len(tgt_pieces), len(src_pieces)):
        raise ValueError(f"attention {weights.shape} for {len(tgt_pieces)} x {len(src_pieces)} pieces")
    size = 0.28  # inches per token keeps the labels legible at any length
    fig = Figure(figsize=(max(4.0, size * len(src_pieces) + 1.5), max(3.0, size * len(tgt_pieces) + 1.5)))
    ax = fig.add_subplot()
    ax.imshow(weights, cmap="gray", vmin=0.0, vmax=1.0, aspect="equal", interpolation="nearest")
    ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tgt_pieces)), tgt_pieces, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=8, pad=12 + 5 * max(len(p) for p in src_pieces))
    return _save(fig, path)


def example_indices(sources: list[str], count: int, words: tuple[int, int] = EXAMPLE_WORDS) -> list[int]:
    """The fixed sentences drawn in Figure 3: the first ``count`` of ``words`` words (else the first ones)."""
    low, high = words
    picks = [i for i, s in enumerate(sources) if low <= len(s.split()) <= high][:count]
    if len(picks) < count:  # a tiny split: take what there is
        picks += [i for i in range(len(sources)) if i not in picks][: count - len(picks)]
    return sorted(picks)


def draw_run_figures(out: Path, best: "ScoreRecord", scored: "ScoreRecord", scored_split: "EvalSplit",
                     hypotheses: list[str], dev: "EvalSplit", checkpoint_dir: Path, eval_cfg: "EvalConfig",
                     device: str = "cpu") -> list[Path]:
    """The end of a run's figures for its best checkpoint (in ``checkpoint_dir``).

    Figure 2 from ``scored`` (the best checkpoint's test score, else its dev score)
    and its ``hypotheses`` of ``scored_split``; Figure 3 for ``eval_cfg.attention_examples``
    fixed sentences of ``dev``, decoded again to get their attention weights.
    """
    from distnmt.evaluate.translator import translator_from_checkpoint

    bins = bleu_by_length(scored_split.sources, hypotheses, scored_split.references, tokenize=eval_cfg.bleu_tokenize)
    title = (f"{best.checkpoint} (step {best.step}) on {scored.test_set}: "
             f"BLEU {scored.bleu:.2f}, beam {scored.beam_size}")
    paths = [plot_bleu_by_length(bins, out / "bleu_by_length.png", title)]
    if eval_cfg.attention_examples:
        picks = example_indices(dev.sources, eval_cfg.attention_examples)
        translator = translator_from_checkpoint(checkpoint_dir, eval_cfg, device=device)
        for index, alignment in zip(picks, translator.attention([dev.sources[i] for i in picks])):
            paths.append(plot_attention(
                alignment.src_pieces, alignment.tgt_pieces, alignment.weights,
                out / f"attention_{dev.name}{index:04d}.png",
                f"{dev.test_set} #{index + 1}, {best.checkpoint}:\n{alignment.translation}",
            ))
    return paths
