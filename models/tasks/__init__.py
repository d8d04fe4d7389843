"""Fine-tuning models: any method's encoder with a task head (``heads``), trained as a ``Method``.

``FinetuneModel`` (``base``) is what every task model shares (frozen parts, layer-wise learning-rate
decay, loading the pretrained encoder); ``Classifier`` covers classification and regression for every
modality (image and audio: a pooled head; text: RoBERTa's sentence head); ``SpeechRecognizer`` (``ctc``)
speech recognition with a per-frame CTC head. What a task reads, how it is scored and which head it
takes are the engine's (``d2v2.engine.finetune.tasks``).
"""

from .base import FinetuneModel, layer_ids
from .classifier import Classifier
from .ctc import CTCHead, FrameMasking, SpeechRecognizer, ctc_loss
from .heads import HEADS, PooledHead, SentenceHead, build_head, masked_mean

__all__ = [
    "HEADS", "CTCHead", "Classifier", "FinetuneModel", "FrameMasking", "PooledHead", "SentenceHead", "SpeechRecognizer",
    "build_head", "ctc_loss", "layer_ids", "masked_mean",
]  # fmt: skip
