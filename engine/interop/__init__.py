"""Interoperability with other codebases' checkpoints: ``import_fairseq`` reads a released fairseq
checkpoint (data2vec 2.0; the CTC fine-tunes of wav2vec 2.0 and data2vec 1.0 too) safely (``safe_pickle``)
into a d2v2 run folder; ``standard_targets`` and ``hf_ctc`` are what ``d2v2 export`` writes for the
standard classes (Hugging Face, timm)."""

from .fairseq_import import import_fairseq, read_fairseq
from .safe_pickle import UnsafePickleError, load_checkpoint_safely

__all__ = ["import_fairseq", "read_fairseq", "UnsafePickleError", "load_checkpoint_safely"]
