"""The RNNsearch / RNNencdec model and its search procedures (no Ray, no torch.distributed)."""

from distnmt.model.rnnsearch import EncoderOutput, PaperGRUCell, RNNSearch
from distnmt.model.search import beam_search, greedy_search

__all__ = ["EncoderOutput", "PaperGRUCell", "RNNSearch", "beam_search", "greedy_search"]
