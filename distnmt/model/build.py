"""Build the model a config describes (one place, used by train/, evaluate/ and translate)."""

from __future__ import annotations

from distnmt.config import ModelConfig
from distnmt.model.encdec import RNNEncDec
from distnmt.model.rnnsearch import RNNSearch


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int = 0) -> RNNSearch:
    """RNNsearch, or the RNNencdec baseline of Cho et al. (2014a) when ``cfg.arch == 'rnnencdec'``."""
    if cfg.arch == "rnnencdec":
        return RNNEncDec(
            src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, embed_size=cfg.embed_size,
            hidden_size=cfg.hidden_size, align_size=cfg.align_size, maxout_size=cfg.maxout_size, gru=cfg.gru,
            dropout=cfg.dropout, pad_id=pad_id, init=cfg.init, tie_embeddings=cfg.tie_embeddings,
        )
    return RNNSearch(
        src_vocab_size=src_vocab_size,
        tgt_vocab_size=tgt_vocab_size,
        embed_size=cfg.embed_size,
        hidden_size=cfg.hidden_size,
        align_size=cfg.align_size,
        maxout_size=cfg.maxout_size,
        attention=True,
        gru=cfg.gru,
        dropout=cfg.dropout,
        pad_id=pad_id,
        init=cfg.init,
        tie_embeddings=cfg.tie_embeddings,
        compile=cfg.compile,
    )
