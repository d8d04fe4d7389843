"""Fine-tuning models: any method's encoder with a task head (``heads``), trained as a ``Method``.

``Classifier`` covers classification and regression for every modality (image and audio: a pooled
head; text: RoBERTa's sentence head). What a task reads, how it is scored and which head it takes are
the engine's (``d2v2.engine.finetune.tasks``).
"""

from .classifier import Classifier, layer_ids
from .heads import HEADS, PooledHead, SentenceHead, build_head, masked_mean

__all__ = ["HEADS", "Classifier", "PooledHead", "SentenceHead", "build_head", "layer_ids", "masked_mean"]
