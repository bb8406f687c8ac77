"""RNNencdec: the RNN Encoder-Decoder of Cho et al. (2014a), the baseline of Bahdanau et al. (2014).

As the two papers describe it (Cho et al. 2014a, section 2 and appendix A;
Bahdanau et al. 2014, sections 2.1 and 4.2):

* encoder: a *unidirectional* GRU over the source embeddings; its state after
  the last word, h_T, has read the whole sentence;
* summary: c = tanh(V h_T), one fixed vector per sentence (Cho et al. eq. 10-11);
* decoder: initial state s_0 = tanh(V' c); every step reads c,
  s_i = GRU(s_{i-1}, [E y_{i-1}; c]), and the deep output reads it too,
  t_i = maxout_2(U_o s_{i-1} + V_o E y_{i-1} + C_o c), then softmax.

The decoder and the deep output are RNNsearch's (inherited, same code), with the
context c_i replaced by the fixed c: so the two models of Figure 2 differ exactly
in what the paper compares, a fixed-length summary of a unidirectional encoder
against a soft alignment over bidirectional annotations. Sizes: the encoder, c
and the decoder have ``hidden_size`` units (paper: 1000 each; Bahdanau et al.
section 4.2 and Cho et al. appendix A).

Two details of Cho et al.'s decoder are not copied, each for a reason:
* their candidate state applies the reset gate to U s + C c together; here c
  enters the GRU's input side (W [E y; c]) like RNNsearch's c_i, so that both
  models share one decoder cell ("paper" or "cudnn" GRU, see rnnsearch.py);
* their deep output reads the new state s_i; Bahdanau et al.'s reads s_{i-1}
  (appendix A.2.2), which we keep for both models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from distnmt.model.rnnsearch import EncoderOutput, PaperGRUCell, RNNSearch, _additive_scores, _recurrence_step

__all__ = ["RNNEncDec"]


class RNNEncDec(RNNSearch):
    """The fixed-vector baseline (``model.arch: rnnencdec``); same interface as :class:`RNNSearch`.

    Args: as :class:`RNNSearch`, less ``align_size`` (no alignment model; accepted
    and ignored so that one config builds either) and ``compile``.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embed_size: int = 620,
        hidden_size: int = 1000,
        align_size: int = 1000,
        maxout_size: int = 500,
        gru: str = "cudnn",
        dropout: float = 0.0,
        pad_id: int = 0,
        init: str = "paper",
        tie_embeddings: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # RNNSearch's __init__ builds a bidirectional encoder and attention
        ctx_size = hidden_size  # c = tanh(V h_T)
        self._set_hyperparameters(src_vocab_size, tgt_vocab_size, embed_size, hidden_size, align_size, maxout_size,
                                  False, gru, pad_id, init, tie_embeddings)
        self._build_embeddings(dropout)
        if gru == "cudnn":
            self.encoder: nn.Module = nn.GRU(embed_size, hidden_size, batch_first=True)
        else:
            self.encoder = PaperGRUCell(embed_size, hidden_size)
        self.summary_proj = nn.Linear(hidden_size, ctx_size)  # V: c = tanh(V h_T)
        self.init_proj = nn.Linear(ctx_size, hidden_size)  # V': s_0 = tanh(V' c)
        self._build_decoder(ctx_size)  # RNNsearch's cell and deep output, over [E y; c]
        self._scores = _additive_scores  # never called: no alignment model
        self._recurrence = _recurrence_step  # eager: model.compile is for RNNsearch's attention
        if init == "paper":
            self._init_paper()

    def _init_paper(self) -> None:
        """Bahdanau et al. appendix B.1 (the baseline was trained alike): orthogonal
        recurrent matrices, zero biases, N(0, 0.01^2) for every other weight."""
        H = self.hidden_size
        recurrent = {
            "encoder.weight_hh_l0", "cell.weight_hh",  # cudnn: [U_r; U_z; U_n]
            *(f"{cell}.{w}.weight" for cell in ("encoder", "cell") for w in ("gate_proj", "candidate_proj")),
        }
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in recurrent:
                    for block in p.split(H, dim=0):
                        nn.init.orthogonal_(block)
                elif p.dim() == 1:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=0.01)
            self.src_embed.weight[self.pad_id].zero_()
            self.tgt_embed.weight[self.pad_id].zero_()

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """h_T of a unidirectional GRU, c = tanh(V h_T), s_0 = tanh(V' c).

        ``annotations`` holds the encoder's states (only beam search's bookkeeping reads
        its shape); ``keys`` is None: nothing attends.
        """
        B, S = src.shape
        lengths_cpu = self._host_lengths(src, src_lengths)
        emb = self.dropout(self.src_embed(src))
        mask = torch.arange(S, device=src.device)[None, :] < src_lengths.to(src.device)[:, None]
        dtype = self.init_proj.weight.dtype
        if isinstance(self.encoder, PaperGRUCell):
            x_proj = self.encoder.input_proj(emb).unbind(1)
            state = emb.new_zeros(B, self.hidden_size, dtype=dtype)
            for t in range(S):  # the state stays put over padding: h_T is at the last real word
                state = torch.where(mask[:, t, None], self.encoder.step(x_proj[t], state).to(dtype), state)
            last = state
        else:
            packed = pack_padded_sequence(emb, lengths_cpu, batch_first=True, enforce_sorted=False)
            _, h_n = self.encoder(packed)
            last = h_n[0]  # the state after each sentence's own last word
        context = torch.tanh(self.summary_proj(last)).to(dtype)
        init_state = torch.tanh(self.init_proj(context)).to(dtype)
        annotations = last.new_zeros(B, S, 1)
        return EncoderOutput(annotations, None, mask, init_state, context)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"RNNencdec (Cho et al. 2014a), gru={self.gru}, params={n:,}"
