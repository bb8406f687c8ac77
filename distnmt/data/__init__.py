"""Data stage: raw WMT'14 text -> sentencepiece -> memory-mapped token arrays -> batches.

Nothing here imports torch.distributed or Ray: the sampler shards by rank from
plain integers, so the same code serves DDP, DeepSpeed and single-process runs.
"""

from distnmt.data.batch import Batch, collate, collate_sentences
from distnmt.data.corpus import open_text, read_lines, read_parallel
from distnmt.data.errors import DataError
from distnmt.data.prepare import PrepareResult, load_manifest, prepare
from distnmt.data.sampler import BucketBatchSampler
from distnmt.data.sgml import read_sgml_segments
from distnmt.data.shards import TokenArray, TokenArrayWriter, write_token_array
from distnmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_sentencepiece

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID",
    "Batch", "BucketBatchSampler", "DataError", "PrepareResult", "TokenArray", "TokenArrayWriter", "Tokenizer",
    "collate", "collate_sentences", "load_manifest", "open_text", "prepare", "read_lines", "read_parallel",
    "read_sgml_segments", "train_sentencepiece", "write_token_array",
]
