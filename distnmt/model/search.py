"""Greedy and beam search for :class:`~distnmt.model.rnnsearch.RNNSearch`.

Both decode a whole batch at once; beam search works on [B * beam] decoder-state
rows with tensor ops only (no Python loop over sentences or beams), while the encoded
source stays one row per sentence that its hypotheses share (see ``RNNSearch.attend``).
Finished sentences leave the batch, so later steps cost less. Both leave the model's
train/eval mode alone: calling ``model.eval()`` is the caller's job.

Length limit, shared by both so that beam size 1 is exactly greedy: sentence b gets
at most ``L_b = max(1, int(max_len_a * src_len_b + max_len_b))`` decoder steps; a
hypothesis that has not produced EOS after L_b tokens ends there, with L_b tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distnmt.model.rnnsearch import RNNSearch

__all__ = ["beam_search", "greedy_search", "max_lengths"]


def max_lengths(src_lengths: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
    """Per-sentence step limit L_b = max(1, int(a * src_len + b)), as int64 on CPU."""
    limits = [max(1, int(max_len_a * n + max_len_b)) for n in src_lengths.tolist()]
    return torch.tensor(limits, dtype=torch.long)


@torch.inference_mode()
def greedy_search(
    model: RNNSearch,
    src: Tensor,
    src_lengths: Tensor,
    bos_id: int,
    eos_id: int,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[int]]:
    """Most probable token at each step, for every sentence of the batch at once.

    Returns the token ids of each sentence, in input order, without BOS and EOS.
    """
    B = src.size(0)
    device = src.device
    limits = max_lengths(src_lengths, max_len_a, max_len_b).to(device)
    enc = model.encode(src, src_lengths)
    state = model.init_decoder_state(enc)
    prev = torch.full((B,), bos_id, dtype=torch.long, device=device)
    lengths = limits.clone()  # output length; shortened when EOS comes first
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = []
    for t in range(int(limits.max()) if B else 0):
        log_probs, state, _ = model.decode_step(enc, prev, state)
        prev = log_probs.argmax(dim=-1)
        steps.append(prev)
        newly_eos = (prev == eos_id) & ~done
        lengths = torch.where(newly_eos, torch.full_like(lengths, t), lengths)
        done |= newly_eos | (limits == t + 1)
        if bool(done.all()):  # one sync per step buys an early exit for the whole batch
            break
    if not steps:
        return [[] for _ in range(B)]
    tokens = torch.stack(steps, dim=1).tolist()
    return [row[:n] for row, n in zip(tokens, lengths.tolist())]


@torch.inference_mode()
def beam_search(
    model: RNNSearch,
    src: Tensor,
    src_lengths: Tensor,
    bos_id: int,
    eos_id: int,
    beam_size: int = 5,
    alpha: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    return_attention: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[Tensor]]:
    """Beam search over all sentences and beams at once.

    Every step each sentence keeps its ``beam_size`` best live (non-EOS) extensions.
    A candidate that ends in EOS and ranks among the ``beam_size`` best of the step
    finishes: it leaves the beam and replaces the sentence's best finished hypothesis
    if its score is higher. Scores are ``sum log p / length ** alpha`` with length
    counting EOS (``alpha=0``: raw sums). A sentence stops when the best live
    hypothesis, scored at its current length, no longer beats the best finished one
    (exact for ``alpha=0``, where scores only fall; the usual heuristic otherwise),
    or at its length limit, where the live hypotheses finish as they are.

    With ``beam_size=1`` this is exactly :func:`greedy_search`.

    Returns token ids per sentence (input order, no BOS/EOS); with
    ``return_attention`` also, per sentence, the best hypothesis' attention
    [tgt_len, src_len] (one row per output token, plus one for EOS if it ended so).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    B, S = src.shape
    K = beam_size
    device = src.device
    neg_inf = float("-inf")
    limits_all = max_lengths(src_lengths, max_len_a, max_len_b).to(device)
    L_max = int(limits_all.max()) if B else 0

    # Results, indexed by original sentence; filled in as hypotheses finish.
    best_score = torch.full((B,), neg_inf, device=device)
    best_tokens = torch.full((B, L_max), eos_id, dtype=torch.long, device=device)
    best_len = torch.zeros(B, dtype=torch.long, device=device)  # tokens without EOS
    best_rows = torch.zeros(B, dtype=torch.long, device=device)  # attention rows
    best_attn = torch.zeros(B, L_max, S, device=device) if return_attention else None

    # Live state, for the still active sentences only (`sent` maps row -> sentence).
    sent = torch.arange(B, device=device)
    limits = limits_all
    # The source side stays one row per sentence; its K hypotheses share it (see attend).
    enc = model.encode(src, src_lengths)
    state = model.init_decoder_state(enc).repeat_interleave(K, dim=0)  # [N, H], N = active * K
    prev = torch.full((B * K,), bos_id, dtype=torch.long, device=device)
    # Only beam 0 is real at the start; the -inf copies keep shapes fixed at K.
    scores = torch.full((B, K), neg_inf, device=device)
    scores[:, 0] = 0.0
    hist = torch.empty(B * K, 0, dtype=torch.long, device=device)  # tokens so far
    attn_hist = torch.empty(B * K, 0, S, device=device) if return_attention else None

    for t in range(L_max):
        n_act = sent.numel()
        log_probs, new_state, attn = model.decode_step(enc, prev, state)
        V = log_probs.size(-1)
        cand = (scores.view(-1, 1) + log_probs).view(n_act, K * V)
        # 2K candidates always hold K non-EOS ones: each beam has a single EOS candidate.
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=-1)
        top_beam, top_tok = top_idx // V, top_idx % V
        is_eos = top_tok == eos_id
        row_base = (torch.arange(n_act, device=device) * K).unsqueeze(1)  # first row per sentence
        length_norm = float(t + 1) ** alpha

        # --- finish: EOS within the top K; at the length limit every top-K candidate.
        at_limit = (limits == t + 1).unsqueeze(1)
        rank_ok = torch.arange(top_idx.size(1), device=device).unsqueeze(0) < K
        finishing = rank_ok & (is_eos | at_limit)
        fin_scores = (top_scores / length_norm).masked_fill(~finishing, neg_inf)
        fin_best, fin_pos = fin_scores.max(dim=-1)  # [n_act]
        improved = fin_best > best_score[sent]
        if bool(improved.any()):
            rows = improved.nonzero().squeeze(1)
            where = sent[rows]
            pos = fin_pos[rows]
            parent = row_base[rows, 0] + top_beam[rows, pos]
            tok = top_tok[rows, pos]
            ended_eos = tok == eos_id
            seq = torch.cat([hist[parent], tok.unsqueeze(1)], dim=1)  # [r, t + 1]
            best_score[where] = fin_best[rows]
            best_tokens[where, : t + 1] = seq
            best_len[where] = torch.where(ended_eos, t, t + 1)
            best_rows[where] = t + 1
            if best_attn is not None:
                best_attn[where, : t + 1] = torch.cat(
                    [attn_hist[parent], attn[parent].unsqueeze(1).float()], dim=1
                )

        # --- continue: the K best non-EOS candidates, already in descending order.
        live_scores, live_pos = top_scores.masked_fill(is_eos, neg_inf).topk(K, dim=-1)
        live_beam = top_beam.gather(1, live_pos)
        live_tok = top_tok.gather(1, live_pos)
        flat_parent = (row_base + live_beam).view(-1)
        scores = live_scores
        prev = live_tok.view(-1)
        state = new_state.index_select(0, flat_parent)
        hist = torch.cat([hist.index_select(0, flat_parent), prev.unsqueeze(1)], dim=1)
        if attn_hist is not None:
            step_attn = attn.index_select(0, flat_parent).float().unsqueeze(1)
            attn_hist = torch.cat([attn_hist.index_select(0, flat_parent), step_attn], dim=1)

        # --- stop sentences that cannot improve (scores sorted: column 0 is the best).
        done = at_limit.squeeze(1) | (best_score[sent] >= live_scores[:, 0] / length_norm)
        if bool(done.all()):
            break
        if bool(done.any()):  # drop finished sentences so later steps cost less
            keep = (~done).nonzero().squeeze(1)
            keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
            sent, limits, scores = sent[keep], limits[keep], scores[keep]
            enc = enc.index_select(keep)
            state, prev, hist = state[keep_rows], prev[keep_rows], hist[keep_rows]
            if attn_hist is not None:
                attn_hist = attn_hist[keep_rows]

    lengths = best_len.tolist()
    hyps = [row[:n] for row, n in zip(best_tokens.tolist(), lengths)]
    if not return_attention:
        return hyps
    assert best_attn is not None
    n_rows = best_rows.tolist()
    attns = [best_attn[b, : n_rows[b], : int(src_lengths[b])].cpu() for b in range(B)]
    return hyps, attns
