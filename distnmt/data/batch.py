"""Turning pair indices into padded tensors for the model.

Layout (teacher forcing): the source gets EOS appended; the target is shifted,
``tgt_in = [BOS] + y`` is what the decoder reads and ``tgt_out = y + [EOS]`` what
it must predict, so both have the same length and align position by position.
Rows stay in the sampler's order; the encoder packs with enforce_sorted=False.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distnmt.data.shards import TokenArray
from distnmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Batch:
    src: torch.LongTensor          # [B, S] right-padded with PAD_ID, each row = ids + [EOS]
    src_lengths: torch.LongTensor  # [B] real length of each src row, EOS included
    tgt_in: torch.LongTensor       # [B, T] = [BOS] + ids, padded
    tgt_out: torch.LongTensor      # [B, T] = ids + [EOS], padded
    indices: list[int]             # pair indices, for tracing a bad batch back to the data
    # Non-pad tokens of ``tgt_out``, counted on the host by collate (None: count them).
    target_tokens: int | None = None

    def num_target_tokens(self) -> int:
        """Tokens the loss is summed over (non-pad in ``tgt_out``): the unit of a token budget.

        Known on the host from collate: counting on the device would make the host
        wait for the device at every step.
        """
        if self.target_tokens is None:
            self.target_tokens = int((self.tgt_out != PAD_ID).sum())
        return self.target_tokens

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with the token tensors on ``device``.

        ``src_lengths`` stays on the host: the encoder packs with host lengths
        (pack_padded_sequence wants them there), and a copy back from the device would
        wait for it; the model moves them itself for the mask.
        """
        return Batch(
            src=self.src.to(device, non_blocking=non_blocking),
            src_lengths=self.src_lengths,
            tgt_in=self.tgt_in.to(device, non_blocking=non_blocking),
            tgt_out=self.tgt_out.to(device, non_blocking=non_blocking),
            indices=self.indices,
            target_tokens=self.num_target_tokens() if self.tgt_out.device.type == "cpu" else self.target_tokens,
        )

    def pin_memory(self) -> "Batch":
        """Page-locked copy, so ``to(cuda, non_blocking=True)`` overlaps with compute.

        Without a CUDA device there is nothing to overlap with: the batch itself.
        """
        if not torch.cuda.is_available():
            return self
        return Batch(
            src=self.src.pin_memory(),
            src_lengths=self.src_lengths.pin_memory(),
            tgt_in=self.tgt_in.pin_memory(),
            tgt_out=self.tgt_out.pin_memory(),
            indices=self.indices,
            target_tokens=self.num_target_tokens(),
        )

    def __len__(self) -> int:
        return len(self.indices)


def _pad(seqs: Sequence[Sequence[int] | np.ndarray], prefix: int | None, suffix: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ``[prefix] + seq + [suffix]`` rows with PAD_ID; returns (matrix, lengths)."""
    extra = (prefix is not None) + (suffix is not None)
    lengths = np.fromiter((len(s) + extra for s in seqs), dtype=np.int64, count=len(seqs))
    out = np.full((len(seqs), int(lengths.max(initial=extra))), PAD_ID, dtype=np.int64)
    start = 1 if prefix is not None else 0
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        if prefix is not None:
            out[row, 0] = prefix
        out[row, start:start + len(seq)] = seq
        if suffix is not None:
            out[row, n - 1] = suffix
    return out, lengths


def collate(src: TokenArray, tgt: TokenArray, indices: list[int]) -> Batch:
    """Build the padded training batch for the pairs ``indices``."""
    if not indices:
        raise ValueError("cannot collate an empty batch")
    src_seqs = [src[i] for i in indices]
    tgt_seqs = [tgt[i] for i in indices]
    src_mat, src_len = _pad(src_seqs, None, EOS_ID)
    tgt_in, _ = _pad(tgt_seqs, BOS_ID, None)
    tgt_out, tgt_len = _pad(tgt_seqs, None, EOS_ID)
    return Batch(
        src=torch.from_numpy(src_mat),
        src_lengths=torch.from_numpy(src_len),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        indices=list(indices),
        target_tokens=int(tgt_len.sum()),
    )


def collate_sentences(seqs: list[list[int]]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Source side only, for translation: append EOS, pad; returns ``(src [B, S], lengths [B])``."""
    if not seqs:
        raise ValueError("cannot collate an empty list of sentences")
    mat, lengths = _pad(seqs, None, EOS_ID)
    return torch.from_numpy(mat), torch.from_numpy(lengths)
