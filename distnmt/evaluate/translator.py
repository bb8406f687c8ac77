"""Text in, text out: a trained checkpoint turned into a translator.

The one decoding path shared by the evaluator actor, ``distnmt evaluate`` and
``distnmt translate``: sentencepiece-encode, sort by length so each batch pads
little, batched beam (or greedy) search, decode, restore the input order.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from distnmt.checkpoint import META_FILE, SRC_SPM, TGT_SPM, CheckpointError, LoadedCheckpoint, load_checkpoint, spm_paths  # noqa: F401  (SRC_SPM, TGT_SPM: re-exported for the tests)
from distnmt.config import Config, EvalConfig, config_from_dict
from distnmt.data.batch import collate_sentences
from distnmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from distnmt.model.build import build_model
from distnmt.model.rnnsearch import RNNSearch
from distnmt.model.search import beam_search, greedy_search

log = logging.getLogger(__name__)



@dataclass
class Alignment:
    """One translated sentence with its attention weights (rows: target, columns: source)."""

    src_pieces: list[str]
    tgt_pieces: list[str]
    weights: "np.ndarray"  # [len(tgt_pieces), len(src_pieces)], each row sums to 1
    translation: str


@dataclass
class Translator:
    """A model in eval mode with its two tokenizers and decoding settings."""

    model: RNNSearch
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    eval_cfg: EvalConfig
    max_src_len: int
    device: torch.device = torch.device("cpu")

    def translate(self, sentences: list[str], progress: bool = False) -> list[str]:
        """Translate ``sentences``; output line i is the translation of input line i."""
        ids = self.src_tok.encode_batch(sentences)
        too_long = sum(len(seq) > self.max_src_len for seq in ids)
        if too_long:
            # The model never saw longer sources; cutting keeps decoding bounded.
            log.warning("%d of %d sentences longer than %d subwords were truncated", too_long, len(ids), self.max_src_len)
            ids = [seq[: self.max_src_len] for seq in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        outputs: list[Optional[str]] = [None] * len(ids)
        size = self.eval_cfg.batch_sentences
        self.model.eval()
        batches = range(0, len(order), size)
        for start in tqdm(batches, desc="translate", unit="batch", disable=not progress, file=sys.stderr):
            chunk = order[start : start + size]
            src, lengths = collate_sentences([ids[i] for i in chunk])
            hyps = self._search(src.to(self.device), lengths.to(self.device))
            for i, hyp in zip(chunk, hyps):
                outputs[i] = self.tgt_tok.decode(hyp)
        return [text if text is not None else "" for text in outputs]

    def attention(self, sentences: list[str]) -> list["Alignment"]:
        """Translate ``sentences`` one batch, keeping each best hypothesis' attention weights.

        For the paper's Figure 3: beam search with this translator's beam size
        (beam 1 is exactly greedy), one [target pieces + EOS, source pieces + EOS]
        matrix per sentence.
        """
        cfg = self.eval_cfg
        ids = [seq[: self.max_src_len] for seq in self.src_tok.encode_batch(sentences)]
        src, lengths = collate_sentences(ids)
        self.model.eval()
        with torch.inference_mode():
            hyps, attns = beam_search(
                self.model, src.to(self.device), lengths.to(self.device), BOS_ID, EOS_ID,
                beam_size=cfg.beam_size, alpha=cfg.alpha, max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b,
                return_attention=True,
            )
        alignments = []
        for seq, hyp, attn in zip(ids, hyps, attns):
            src_pieces = [self.src_tok.id_to_piece(i) for i in seq] + ["</s>"]
            # The last row is EOS's when the hypothesis ended with it rather than at the length limit.
            tgt_pieces = [self.tgt_tok.id_to_piece(i) for i in hyp] + ["</s>"] * (attn.size(0) - len(hyp))
            alignments.append(Alignment(src_pieces, tgt_pieces, attn.float().numpy(), self.tgt_tok.decode(hyp)))
        return alignments

    def _search(self, src: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        cfg = self.eval_cfg
        with torch.inference_mode():
            if cfg.beam_size == 1:
                return greedy_search(self.model, src, lengths, BOS_ID, EOS_ID, cfg.max_len_a, cfg.max_len_b)
            return beam_search(
                self.model, src, lengths, BOS_ID, EOS_ID,
                beam_size=cfg.beam_size, alpha=cfg.alpha, max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b,
            )


def model_from_checkpoint(ckpt: LoadedCheckpoint, device: torch.device | str = "cpu") -> tuple[RNNSearch, Config]:
    """Rebuild the model of a checkpoint with its weights, in eval mode."""
    cfg = config_from_dict(ckpt.meta["config"])
    vocab = ckpt.meta["vocab_size"]
    model = build_model(cfg.model, vocab["src"], vocab["tgt"], pad_id=PAD_ID)
    try:
        model.load_state_dict(ckpt.state["model"])
    except RuntimeError as err:  # names and shapes, first line only: the rest is a list of tensors
        reason = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ckpt.path}: weights do not fit the model config in its {META_FILE} ({reason})") from None
    return model.to(device).eval(), cfg


def translator_from_checkpoint(
    path: Path | str, eval_cfg: Optional[EvalConfig] = None, device: torch.device | str = "cpu"
) -> Translator:
    """A Translator from a checkpoint directory alone (it carries its sentencepiece models).

    ``eval_cfg`` overrides the decoding settings stored in the checkpoint's config.
    """
    ckpt = load_checkpoint(Path(path), map_location=device)
    model, cfg = model_from_checkpoint(ckpt, device)
    return Translator(
        model=model,
        src_tok=Tokenizer(spm_paths(ckpt.path)[0]),
        tgt_tok=Tokenizer(spm_paths(ckpt.path)[1]),
        eval_cfg=eval_cfg or cfg.eval,
        max_src_len=(eval_cfg or cfg.eval).max_src_len,
        device=torch.device(device),
    )
