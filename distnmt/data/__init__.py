"""Data stage: WMT'14 sources -> cleaning -> sentencepiece -> sharded token arrays -> batches.

Nothing here imports torch.distributed or Ray: the sampler shards by rank from
plain integers, so the same code serves DDP, DeepSpeed and single-process runs.
The batching names (``Batch``, ``collate``, ``collate_sentences``) are imported
on first use, so ``distnmt prepare`` and its worker processes never load torch.
"""

from __future__ import annotations

from typing import Any

from distnmt.data.clean import CleanRules
from distnmt.data.corpus import open_text, read_lines, read_parallel
from distnmt.data.errors import DataError
from distnmt.data.prepare import PrepareResult, prepare
from distnmt.data.prepared import PreparedData, load_manifest
from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.sgml import read_sgml, read_sgml_parallel, read_sgml_segments
from distnmt.data.shards import TokenArray, TokenArrayWriter, write_token_array
from distnmt.data.sources import REGISTRY
from distnmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_sentencepiece

_LAZY = {"Batch", "collate", "collate_sentences"}

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "REGISTRY",
    "Batch", "BucketBatchSampler", "CleanRules", "DataError", "PrepareResult", "PreparedData", "TokenArray", "TokenArrayWriter",
    "Tokenizer", "collate", "collate_sentences", "load_manifest", "open_text", "prepare", "read_lines",
    "read_parallel", "read_sgml", "read_sgml_parallel", "read_sgml_segments", "train_sentencepiece",
    "write_token_array",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from distnmt.data import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'distnmt.data' has no attribute {name!r}")
