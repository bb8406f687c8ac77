"""RNNsearch (Bahdanau, Cho & Bengio 2014) and its RNNencdec baseline.

The model follows section 3 and appendix A of arXiv:1409.0473:

* encoder: bidirectional GRU over source embeddings; annotation h_j = [fwd_j; bwd_j];
* alignment model: e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j), softmax over the real
  source positions only; U_a h_j ("keys") is computed once per batch, and beam search's
  hypotheses share their sentence's keys and annotations (no copy per hypothesis);
* decoder: GRU with input [E y_{i-1}; c_i], initial state s_0 = tanh(W_s bwd_1);
* deep output: t_i = maxout_2(U_o s_{i-1} + V_o E y_{i-1} + C_o c_i), then a linear
  layer to the target vocabulary.

With ``attention=False`` the same decoder reads one fixed context vector instead
(RNNencdec, the paper's baseline). The paper's encdec encoder is unidirectional and
uses its last hidden state; we keep the bidirectional encoder so the two models differ
only in attention, and use c = [fwd_{T_x}; bwd_1], the final state of each direction
(the two states that have read the whole sentence). It has the same size (2H) as an
annotation, so every other layer is shared in shape with RNNsearch.

Nothing here imports Ray or torch.distributed: the model is plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = ["EncoderOutput", "PaperGRUCell", "RNNSearch", "compile_mode", "gru_cell_fp32_gates"]

GRU_VARIANTS = ("cudnn", "paper")
INIT_SCHEMES = ("paper", "torch")


@dataclass
class EncoderOutput:
    """Everything the decoder needs from the source side, batch-first.

    ``keys`` is None for RNNencdec (no alignment model); ``context`` is the fixed
    context vector of RNNencdec and None for RNNsearch.
    """

    annotations: Tensor  # [B, S, 2H]  h_j = [fwd_j; bwd_j], zero on padding
    keys: Tensor | None  # [B, S, A]   U_a h_j (+ b_a)
    mask: Tensor  # [B, S] bool, True on real source positions
    init_state: Tensor  # [B, H]      s_0 = tanh(W_s bwd_1)
    context: Tensor | None = None  # [B, 2H] RNNencdec only

    def index_select(self, idx: Tensor) -> EncoderOutput:
        """Rows ``idx`` of the batch (reorder, drop or repeat; beam search drops finished sentences)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, idx)

        return EncoderOutput(
            annotations=pick(self.annotations),
            keys=pick(self.keys),
            mask=pick(self.mask),
            init_state=pick(self.init_state),
            context=pick(self.context),
        )


def _additive_scores(keys: Tensor, query: Tensor, v: Tensor) -> Tensor:
    """e = v^T tanh(keys + query) over the last dim: [B, 1, S, A] + [B, k, 1, A] -> [B, k, S].

    The sum is built in place: one [B, k, S, A] buffer instead of two, the biggest
    tensor of a decoder step (beam 12: 12 rows per sentence, S x A each).
    """
    return F.linear((keys + query).tanh_(), v).squeeze(-1)


def _additive_scores_plain(keys: Tensor, query: Tensor, v: Tensor) -> Tensor:
    """:func:`_additive_scores` without the in-place op, for torch.compile to fuse."""
    return F.linear(torch.tanh(keys + query), v).squeeze(-1)


def compile_mode(compile: bool | str) -> str | None:
    """``model.compile`` as None (eager), "scores" or "step"; True means "scores"."""
    modes = {False: None, True: "scores", "scores": "scores", "step": "step"}
    if isinstance(compile, str) and compile not in modes or not isinstance(compile, (bool, str)):
        raise ValueError(f"model.compile must be false, true, 'scores' or 'step', got {compile!r}")
    return modes[compile]


def _recurrence_step(model: RNNSearch, emb: Tensor, state: Tensor, enc: EncoderOutput) -> tuple[Tensor, Tensor]:
    """c_i and s_i from E y_{i-1} and s_{i-1}: the part of a training step that feeds back."""
    context, _ = model.attend(state, enc)
    return context, model._cell_step(emb, context, state)


class PaperGRUCell(nn.Module):
    """The GRU of the paper (appendix A.2.2), reset gate applied *before* U.

        z_i  = sigmoid(W_z x_i + U_z s_{i-1} + b_z)
        r_i  = sigmoid(W_r x_i + U_r s_{i-1} + b_r)
        s~_i = tanh(W x_i + U [r_i * s_{i-1}] + b)
        s_i  = (1 - z_i) * s_{i-1} + z_i * s~_i

    Here x_i = [E y_{i-1}; c_i], so ``W x_i`` is the paper's ``W E y_{i-1} + C c_i``.
    cuDNN / ``nn.GRUCell`` instead compute ``r * (U s + b_hn)``; that cannot be fused
    the same way, which is why both variants exist.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        # Input side of all three gates in one matmul; rows ordered [z; r; candidate].
        self.input_proj = nn.Linear(input_size, 3 * hidden_size)
        # Recurrent side: gates read s_{i-1}, the candidate reads r * s_{i-1}, so two matmuls.
        self.gate_proj = nn.Linear(hidden_size, 2 * hidden_size, bias=False)  # [U_z; U_r]
        self.candidate_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # U

    def forward(self, x: Tensor, state: Tensor) -> Tensor:
        """One step: ``x`` [B, input_size], ``state`` [B, H] -> new state [B, H]."""
        return self.step(self.input_proj(x), state)

    def step(self, x_proj: Tensor, state: Tensor) -> Tensor:
        """One step from the input side already projected (``input_proj(x)``, [B, 3H]).

        The encoder projects a whole sentence in one matmul and then only runs this.
        """
        # Under autocast the matmuls return the low precision; the gates and the update
        # are computed in the state's dtype (fp32), so the state is carried in it.
        x_z, x_r, x_n = x_proj.to(state.dtype).chunk(3, dim=-1)
        h_z, h_r = self.gate_proj(state).to(state.dtype).chunk(2, dim=-1)
        z = torch.sigmoid(x_z + h_z)
        r = torch.sigmoid(x_r + h_r)
        candidate = torch.tanh(x_n + self.candidate_proj(r * state).to(state.dtype))
        return (1 - z) * state + z * candidate


def gru_cell_fp32_gates(cell: nn.GRUCell, x: Tensor, state: Tensor) -> Tensor:
    """``nn.GRUCell``'s equations with its two matmuls in the autocast dtype and the
    gates and update in the state's dtype (fp32).

    Under CUDA autocast ``nn.GRUCell`` (ATen's ``gru_cell``, on autocast's fp16 list)
    runs whole in fp16, gates and update included, and on CPU its gates come out of
    bf16 matmuls in bf16: either way the state would be updated in the low precision
    at every step. Same formula and order as ATen's CPU ``GRUCell``:
    r = sigma(i_r + h_r), z = sigma(i_z + h_z), n = tanh(i_n + r * h_n),
    s' = (s - n) * z + n, with gates ordered [r; z; n].
    """
    gi = F.linear(x, cell.weight_ih, cell.bias_ih).to(state.dtype)
    gh = F.linear(state, cell.weight_hh, cell.bias_hh).to(state.dtype)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(h_r + i_r)
    z = torch.sigmoid(h_z + i_z)
    n = torch.tanh(i_n + h_n * r)
    return (state - n) * z + n


class PaperBiGRU(nn.Module):
    """The paper's bidirectional encoder (appendix A.2.1): two :class:`PaperGRUCell`.

    Reads right-padded input with a mask, one time step at a time (the reset gate
    before U has no fused kernel). The forward cell keeps its state over padding, so
    its final state is the one at the last real word; the backward cell starts from
    zero at each sentence's own last word, as if there were no padding.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.fwd = PaperGRUCell(input_size, hidden_size)
        self.bwd = PaperGRUCell(input_size, hidden_size)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` [B, S, E], ``mask`` [B, S] (True on real words) ->
        annotations [B, S, 2H] (zero on padding), fwd at the last word [B, H], bwd_1 [B, H]."""
        B, S, _ = x.shape
        dtype = self.fwd.gate_proj.weight.dtype  # states stay in it under autocast, as the decoder's
        keep = mask.unsqueeze(-1)  # [B, S, 1]
        outputs = []
        for cell, order in ((self.fwd, range(S)), (self.bwd, range(S - 1, -1, -1))):
            # All S input projections in one matmul; unbind, not x[:, t]: see RNNSearch.forward.
            x_proj = cell.input_proj(x).unbind(1)
            state = x.new_zeros(B, self.hidden_size, dtype=dtype)
            states: list[Tensor] = [state] * S
            for t in order:
                state = torch.where(keep[:, t], cell.step(x_proj[t], state).to(dtype), state)
                states[t] = state
            outputs.append((torch.stack(states, dim=1), state))
        (fwd_all, fwd_last), (bwd_all, bwd_first) = outputs
        annotations = torch.cat([fwd_all, bwd_all], dim=-1) * keep  # fwd holds its last state over padding
        return annotations, fwd_last, bwd_first


class RNNSearch(nn.Module):
    """RNNsearch (``attention=True``) or RNNencdec (``attention=False``).

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (ids ``pad_id`` is padding).
        embed_size: word embedding size (paper: 620).
        hidden_size: GRU units per direction in the encoder and in the decoder (paper: 1000).
        align_size: hidden size of the alignment model (paper: 1000).
        maxout_size: deep-output units after max pooling pairs (paper: 500).
        attention: False builds RNNencdec, which has no alignment parameters at all.
        gru: the GRU of encoder and decoder: "cudnn" (``nn.GRU`` on packed sequences and
            ``nn.GRUCell``: reset gate after the recurrent matmul, fused kernels) or
            "paper" (:class:`PaperBiGRU` and :class:`PaperGRUCell`: reset gate before U,
            exactly the paper's equations, a Python loop over source positions).
        dropout: applied to the embeddings and to the maxout output (paper: none).
        pad_id: padding id of both vocabularies.
        init: "paper" (appendix B.1) or "torch" (PyTorch defaults).
        tie_embeddings: the output layer W_o reuses the target embedding matrix E
            (paper: separate). W_o reads the maxout output (``maxout_size`` wide) and
            E has ``embed_size`` columns, so when the two differ a bias-free
            projection ``output_proj`` (maxout_size -> embed_size) is inserted.
        compile: what goes through ``torch.compile`` (needs a C++ compiler):
            False: nothing (the eager reference). True or "scores": the alignment
            scores v_a^T tanh(W_a s + U_a h_j), in training and decoding (the first
            batch compiles for 15-60 s; fused they ran 2-3x faster). "step": the
            whole recurrence step of teacher-forced training (attention, the GRU
            cell and its gate math: one graph called T times per batch, its
            elementwise work fused); decoding stays eager. See docs/MODEL.md.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embed_size: int = 620,
        hidden_size: int = 1000,
        align_size: int = 1000,
        maxout_size: int = 500,
        attention: bool = True,
        gru: str = "cudnn",
        dropout: float = 0.0,
        pad_id: int = 0,
        init: str = "paper",
        tie_embeddings: bool = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        ctx_size = 2 * hidden_size  # an annotation, or the encdec fixed context
        self._set_hyperparameters(src_vocab_size, tgt_vocab_size, embed_size, hidden_size, align_size, maxout_size,
                                  attention, gru, pad_id, init, tie_embeddings)
        self._build_embeddings(dropout)
        if gru == "cudnn":
            self.encoder: nn.Module = nn.GRU(embed_size, hidden_size, batch_first=True, bidirectional=True)
        else:
            self.encoder = PaperBiGRU(embed_size, hidden_size)
        self.init_proj = nn.Linear(hidden_size, hidden_size)  # W_s

        if attention:
            self.query_proj = nn.Linear(hidden_size, align_size, bias=False)  # W_a
            self.key_proj = nn.Linear(ctx_size, align_size)  # U_a (its bias is b_a)
            self.energy = nn.Linear(align_size, 1, bias=False)  # v_a

        self._build_decoder(ctx_size)
        mode = compile_mode(compile)
        # The alignment scores through torch.compile (one fused add-tanh-dot kernel), or
        # eager. A module-level function, not a bound method: no reference cycle.
        self._scores: Callable[[Tensor, Tensor, Tensor], Tensor] = _additive_scores
        if mode == "scores" and attention:
            self._scores = torch.compile(_additive_scores_plain, dynamic=True)
        # The training recurrence step (attention + cell) through torch.compile, or eager.
        # Module-level again, the model passed in. Shapes are static at first; the
        # sampler's length buckets then make torch mark the changing dims dynamic after
        # the first recompile (dynamic=True fails on the GRU cell's shapes in torch 2.13;
        # docs/MODEL.md).
        self._recurrence: Callable[..., tuple[Tensor, Tensor]] = _recurrence_step
        if mode == "step":
            self._recurrence = torch.compile(_recurrence_step, fullgraph=True)

        if init == "paper":
            self._init_paper()

    # ------------------------------------------------------------ the parts

    # RNNEncDec builds with these too (encdec.py), in the same order, so that both models
    # draw their initial weights alike from one seed.

    def _set_hyperparameters(self, src_vocab_size: int, tgt_vocab_size: int, embed_size: int, hidden_size: int,
                             align_size: int, maxout_size: int, attention: bool, gru: str, pad_id: int, init: str,
                             tie_embeddings: bool) -> None:
        """Check the choices (one-line errors naming the config key) and keep the sizes."""
        if gru not in GRU_VARIANTS:
            raise ValueError(f"model.gru must be one of {GRU_VARIANTS}, got {gru!r}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"model.init must be one of {INIT_SCHEMES}, got {init!r}")
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        self.embed_size = embed_size
        self.hidden_size = hidden_size
        self.align_size = align_size
        self.maxout_size = maxout_size
        self.attention = attention
        self.gru = gru
        self.pad_id = pad_id
        self.tie_embeddings = tie_embeddings

    def _build_embeddings(self, dropout: float) -> None:
        """The source and target embeddings (E) and the dropout both sides share."""
        self.src_embed = nn.Embedding(self.src_vocab_size, self.embed_size, padding_idx=self.pad_id)
        self.tgt_embed = nn.Embedding(self.tgt_vocab_size, self.embed_size, padding_idx=self.pad_id)
        self.dropout = nn.Dropout(dropout)

    def _build_decoder(self, ctx_size: int) -> None:
        """The decoder's GRU cell over [E y_{i-1}; c_i] and the deep output (appendix A.2.2)."""
        E, H, M = self.embed_size, self.hidden_size, self.maxout_size
        self.cell: nn.Module = nn.GRUCell(E + ctx_size, H) if self.gru == "cudnn" else PaperGRUCell(E + ctx_size, H)
        # [U_o, V_o, C_o] as one matrix over [s_{i-1}; E y_{i-1}; c_i]: one matmul for all T.
        self.pre_output = nn.Linear(H + E + ctx_size, 2 * M)
        # W_o. Tied, it is E itself ([V, embed_size]); the projection bridges the sizes.
        self.output_proj: nn.Linear | None = None
        if self.tie_embeddings and M != E:
            self.output_proj = nn.Linear(M, E, bias=False)
        self.output = nn.Linear(E if self.tie_embeddings else M, self.tgt_vocab_size)
        if self.tie_embeddings:
            self.output.weight = self.tgt_embed.weight

    @staticmethod
    def _host_lengths(src: Tensor, src_lengths: Tensor) -> Tensor:
        """``src_lengths`` on the host as int64, checked against ``src`` [B, S]."""
        B, S = src.shape
        lengths_cpu = src_lengths.detach().to("cpu", torch.int64)
        if lengths_cpu.numel() != B:
            raise ValueError(f"src_lengths has {lengths_cpu.numel()} entries for a batch of {B}")
        if B and (int(lengths_cpu.min()) < 1 or int(lengths_cpu.max()) > S):
            raise ValueError(f"source lengths must lie in [1, {S}], got {lengths_cpu.tolist()}")
        return lengths_cpu

    # ------------------------------------------------------------------ init

    def _init_paper(self) -> None:
        """Appendix B.1: orthogonal recurrent matrices, N(0, 0.001^2) for W_a and U_a,
        zero v_a and biases, N(0, 0.01^2) for every other weight."""
        H = self.hidden_size
        recurrent = {
            "encoder.weight_hh_l0",  # cudnn encoder, forward: [U_r; U_z; U_n]
            "encoder.weight_hh_l0_reverse",  # cudnn encoder, backward
            "cell.weight_hh",  # cudnn cell: [U_r; U_z; U_n]
            *(f"{cell}.{w}.weight" for cell in ("encoder.fwd", "encoder.bwd", "cell")
              for w in ("gate_proj", "candidate_proj")),  # paper cells: [U_z; U_r] and U
        }
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in recurrent:
                    # Each gate's H x H block is its own orthogonal matrix, as in the paper.
                    for block in p.split(H, dim=0):
                        nn.init.orthogonal_(block)
                elif name in ("query_proj.weight", "key_proj.weight"):
                    nn.init.normal_(p, std=0.001)
                elif name == "energy.weight" or p.dim() == 1:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=0.01)
            # The normal init above also wrote the padding rows.
            self.src_embed.weight[self.pad_id].zero_()
            self.tgt_embed.weight[self.pad_id].zero_()

    # --------------------------------------------------------------- encoder

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """Encode right-padded ``src`` [B, S] with true lengths ``src_lengths`` [B].

        Packing (cudnn) or masking (paper) makes the result independent of how much
        padding a batch has.
        """
        B, S = src.shape
        lengths_cpu = self._host_lengths(src, src_lengths)
        emb = self.dropout(self.src_embed(src))
        # Lengths on the host (Batch.to keeps them there) reach the device by a queued
        # copy; lengths already there are used as they are.
        dev_lengths = src_lengths if src_lengths.device == src.device else lengths_cpu.to(src.device, non_blocking=True)
        mask = torch.arange(S, device=src.device)[None, :] < dev_lengths[:, None]
        if isinstance(self.encoder, PaperBiGRU):
            annotations, fwd_last, bwd_first = self.encoder(emb, mask)
        else:
            packed = pack_padded_sequence(emb, lengths_cpu, batch_first=True, enforce_sorted=False)
            packed_out, h_n = self.encoder(packed)
            # Unpacked in the sorted order, then put back in the batch's order on the
            # device: pad_packed_sequence would also unsort the lengths, reading the
            # device's unsorted_indices back to the host (a sync per batch on a GPU).
            sorted_out = PackedSequence(packed_out.data, packed_out.batch_sizes)
            annotations, _ = pad_packed_sequence(sorted_out, batch_first=True, total_length=S)
            annotations = annotations.index_select(0, packed_out.unsorted_indices)
            # h_n[0] is fwd at the last real word; h_n[1] is bwd_1, the backward state at word 1.
            fwd_last, bwd_first = h_n[0], h_n[1]
        # The decoder state is carried in the parameters' dtype (fp32 under autocast):
        # matmuls still run in bf16/fp16, but 50+ recurrent updates do not pile up rounding.
        init_state = torch.tanh(self.init_proj(bwd_first)).to(self.init_proj.weight.dtype)
        if self.attention:
            # Under autocast every decoder step multiplies the annotations (bmm, in the
            # autocast dtype): cast them once here instead of once per step.
            annotations = annotations.to(self._compute_dtype(src.device))
            return EncoderOutput(annotations, self.key_proj(annotations), mask, init_state)
        context = torch.cat([fwd_last, bwd_first], dim=-1)
        return EncoderOutput(annotations, None, mask, init_state, context)

    # --------------------------------------------------------------- decoder

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype matmuls run in: autocast's inside an autocast region, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.init_proj.weight.dtype

    def init_decoder_state(self, enc: EncoderOutput) -> Tensor:
        """s_0 [B, H] (already computed by :meth:`encode`)."""
        return enc.init_state

    def attend(self, state: Tensor, enc: EncoderOutput) -> tuple[Tensor, Tensor]:
        """Context c_i [N, 2H] and weights alpha_i [N, S] for decoder states s_{i-1} [N, H].

        ``enc`` has B rows and N = B * k: the k consecutive state rows b*k .. b*k+k-1
        all read sentence b (k = 1 in training and greedy search, k = beam size in
        beam search, which so never copies the source side per hypothesis).
        RNNencdec returns its fixed context and all-zero weights (it aligns nothing).
        """
        B, N = enc.mask.size(0), state.size(0)
        if N % max(B, 1):
            raise ValueError(f"{N} decoder states for {B} encoded sentences: need a multiple")
        k = N // B if B else 1
        if not self.attention:
            assert enc.context is not None
            context = enc.context if k == 1 else enc.context.repeat_interleave(k, dim=0)
            return context, enc.mask.new_zeros((N, enc.mask.size(1)), dtype=torch.float32)
        assert enc.keys is not None
        query = self.query_proj(state).view(B, k, 1, -1)  # W_a s_{i-1}: [B, k, 1, A]
        energies = self._scores(enc.keys.unsqueeze(1), query, self.energy.weight)  # [B, k, S]
        # Softmax in fp32 (bf16 would round weights visibly); -inf makes padding exactly 0.
        energies = energies.float().masked_fill(~enc.mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(energies, dim=-1)
        context = torch.bmm(weights.to(enc.annotations.dtype), enc.annotations)  # [B, k, 2H]
        return context.view(N, -1), weights.view(N, -1)

    def _cell_step(self, emb: Tensor, context: Tensor, state: Tensor) -> Tensor:
        """s_i = GRU([E y_{i-1}; c_i], s_{i-1})."""
        # The cell's input is only ever multiplied, so it is built in the compute dtype
        # (no per-step fp32 round trip under autocast); the output comes back in the
        # state's dtype (see :meth:`encode`).
        dtype = self._compute_dtype(state.device)
        x = torch.cat([emb.to(dtype), context.to(dtype)], dim=-1)
        if dtype != state.dtype and isinstance(self.cell, nn.GRUCell):
            # Under autocast: the fused cell would update the state in low precision.
            return gru_cell_fp32_gates(self.cell, x, state)
        return self.cell(x, state).to(state.dtype)

    def _logits(self, state: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        """Deep output for any leading shape: [..., H], [..., E], [..., 2H] -> [..., V]."""
        dtype = self._compute_dtype(state.device)
        pre = self.pre_output(torch.cat([state.to(dtype), emb.to(dtype), context.to(dtype)], dim=-1))
        t = self.dropout(pre.unflatten(-1, (self.maxout_size, 2)).amax(dim=-1))  # maxout, pool of 2
        if self.output_proj is not None:
            t = self.output_proj(t)
        return self.output(t)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits [B, T, V_tgt] (fp32) for ``tgt_in`` [B, T] (starts with BOS).

        The recurrence only produces s_{i-1} and c_i; the deep output does not feed
        back, so it runs once for all T steps (the biggest matmul, [B*T, M] x [M, V]).
        """
        enc = self.encode(src, src_lengths)
        # Cast once for all T steps; the embedding itself is an fp32 lookup.
        emb = self.dropout(self.tgt_embed(tgt_in)).to(self._compute_dtype(src.device))  # [B, T, E]
        state = self.init_decoder_state(enc)
        states, contexts = [], []
        # unbind, not emb[:, i]: the backward of T selects would write T zero-filled
        # [B, T, E] gradients; unbind's backward is one stack.
        for emb_i in emb.unbind(1):
            states.append(state)
            context, state = self._recurrence(self, emb_i, state, enc)
            contexts.append(context)
        prev_states = torch.stack(states, dim=1)  # s_{i-1}: [B, T, H]
        all_contexts = torch.stack(contexts, dim=1)  # c_i: [B, T, 2H]
        return self._logits(prev_states, emb, all_contexts).float()

    def decode_step(
        self, enc: EncoderOutput, prev_tokens: Tensor, state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder step from y_{i-1} [N] and s_{i-1} [N, H].

        Returns log p(y_i | ...) [N, V] in fp32, s_i [N, H] and alpha_i [N, S].
        ``enc`` holds N sentences, or N / k sentences each read by k consecutive
        rows (beam search's hypotheses; see :meth:`attend`).
        """
        emb = self.dropout(self.tgt_embed(prev_tokens))
        context, weights = self.attend(state, enc)
        log_probs = F.log_softmax(self._logits(state, emb, context).float(), dim=-1)
        new_state = self._cell_step(emb, context, state)
        return log_probs, new_state, weights

    def extra_repr(self) -> str:
        kind = "RNNsearch" if self.attention else "RNNencdec"
        n = sum(p.numel() for p in self.parameters())
        return f"{kind}, gru={self.gru}, params={n:,}"
