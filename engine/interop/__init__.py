"""Interoperability with other codebases' checkpoints: ``import_fairseq`` reads a released fairseq
data2vec 2.0 checkpoint safely (``safe_pickle``) into a d2v2 run folder."""

from .fairseq_import import import_fairseq, read_fairseq
from .safe_pickle import UnsafePickleError, load_checkpoint_safely

__all__ = ["import_fairseq", "read_fairseq", "UnsafePickleError", "load_checkpoint_safely"]
