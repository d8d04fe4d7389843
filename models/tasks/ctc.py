"""Speech recognition with CTC: an audio encoder, fine-tuning's masks, a per-frame linear head, the CTC loss.

wav2vec 2.0's fine-tuning (Baevski et al., 2020, section 3.3 and 4), which data2vec and data2vec 2.0
reuse: fairseq ``fairseq/models/wav2vec/wav2vec2_asr.py`` (``Wav2VecCtc``, ``Wav2VecEncoder``) and
``fairseq/criterions/ctc.py``. One step::

    x, pad  = encoder.maskable_features(wave)       [B, N, D]   the features pretraining masked too
    x       = fill(x, mask, channel_mask)                       time spans -> the method's fill, channels -> 0
    x       = encoder.encode_features(x, pad)       [B, N, D]   positions, blocks (LayerDrop)
    logits  = head(x)                               [B, N, V]   dropout, Linear(D, V)
    loss    = CTC(log_softmax(logits), labels) summed over the utterances / B

- The encoder runs under ``no_grad`` for the first ``freeze_updates`` updates (``freeze_finetune_updates``):
  only the head learns while it is random. ``after_step`` tells the model the update count.
- The loss is fairseq's ``ctc`` criterion with ``sentence_avg``: ``F.ctc_loss`` in fp32 with
  ``reduction="sum"`` and ``zero_infinity`` (an utterance whose transcript cannot fit its frames adds
  0, not inf), divided by the number of utterances; frames that are padding are outside each
  utterance's input length.
- The head's weight is xavier-uniform with a zero bias (``wav2vec2_asr.Linear``).
- The time and channel masks come with the batch (``FrameMasking`` makes them in the loader workers);
  evaluation batches have none.

The vocabulary is the engine's (``d2v2.engine.finetune.letters``); the model knows only the blank's index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.mask_fill import MaskFill
from ..layers.masking import wav2vec_span_mask
from ..modalities import Modality
from .base import FinetuneModel

__all__ = ["CTCHead", "FrameMasking", "SpeechRecognizer", "ctc_loss"]


class CTCHead(nn.Module):
    """Per-frame logits: dropout (fairseq's ``final_dropout``) -> Linear(D, V).

    Args:
        dim: the encoder's width D.
        num_outputs: the vocabulary V (blank and special symbols included).
        dropout: before the linear layer.
    """

    def __init__(self, dim: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.spec = {"kind": "ctc", "dim": dim, "num_outputs": num_outputs, "dropout": dropout}
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_outputs)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, D] -> [B, N, V]; padded frames get logits too (their input lengths leave them out)."""
        return self.linear(self.dropout(x))


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, label_lengths: torch.Tensor,
             blank: int = 0, zero_infinity: bool = True) -> torch.Tensor:  # fmt: skip
    """CTC loss of ``logits`` [B, N, V] (frames ``lengths`` [B] of each utterance) for ``labels`` [B, S]
    (padded; ``label_lengths`` [B] of each): summed over the utterances, divided by B, in fp32."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [N, B, V], as ctc_loss takes it
    # cuDNN's CTC needs int32 lengths on the CPU and a blank of 0, and is not deterministic: the reference
    # turns it off too.
    with torch.backends.cudnn.flags(enabled=False):
        loss = F.ctc_loss(log_probs, labels, lengths, label_lengths, blank=blank, reduction="sum",
                          zero_infinity=zero_infinity)  # fmt: skip
    return loss / logits.shape[0]


@dataclass(frozen=True)
class FrameMasking:
    """Fine-tuning's time and channel masks of a batch, made in the loader workers (picklable).

    Time masks: wav2vec 2.0's spans over each utterance's own frames (padding never masked), at least
    ``min_spans`` per utterance, the same count in every row (``require_same_masks``). Channel masks:
    the same spans over the D channels (one draw per utterance, every frame), at least none (fairseq's
    ``compute_mask_indices`` defaults for channels).
    """

    modality: Modality
    """The encoder's modality: frames per utterance (``num_frames``)."""
    dim: int
    """The feature width D."""
    mask_prob: float
    mask_length: int
    min_spans: int
    channel_prob: float
    channel_length: int

    def __call__(self, lengths: torch.Tensor, num_samples: int, generator: torch.Generator) -> dict:
        """Masks for utterances of ``lengths`` samples padded to ``num_samples``: ``{"mask": bool [B, N]}``
        and ``{"channel_mask": bool [B, D]}`` where their probability is above 0."""
        out = {}
        batch = lengths.shape[0]
        if self.mask_prob > 0:
            frames = int(self.modality.num_frames(num_samples))
            own = self.modality.num_frames(lengths).clamp(1, frames)
            out["mask"] = wav2vec_span_mask(batch, frames, self.mask_prob, self.mask_length, self.min_spans,
                                            generator, lengths=own)  # fmt: skip
        if self.channel_prob > 0:
            out["channel_mask"] = wav2vec_span_mask(batch, self.dim, self.channel_prob, self.channel_length, 0, generator)
        return out


class SpeechRecognizer(FinetuneModel):
    """An audio encoder with a CTC head: per-frame logits over a vocabulary, trained with the CTC loss.

    Batch: ``source`` [B, T], optional ``padding_mask`` [B, T]; in training ``mask`` [B, N] and
    ``channel_mask`` [B, D] (optional, ``FrameMasking``); the targets ``label`` int [B, S] (padded) with
    ``label_lengths`` [B].

    Args:
        encoder: an audio encoder with ``maskable_features`` / ``encode_features`` (data2vec 2.0,
            data2vec 1.0, wav2vec 2.0).
        modality: the method's modality object.
        head: a ``CTCHead``.
        mask_fill: the method's ``MaskFill`` (``Method.mask_fill``); None: zeros.
        blank: the blank's index in the vocabulary.
        freeze_updates: the encoder stays as it is (no gradient) for this many updates.
        layer_decay, layerdrop, freeze_feature_encoder: as ``FinetuneModel``'s.
    """

    def __init__(self, encoder: nn.Module, modality: Modality, head: CTCHead, mask_fill: MaskFill | None = None,
                 blank: int = 0, freeze_updates: int = 0, layer_decay: float = 1.0, layerdrop: bool = False,
                 freeze_feature_encoder: bool = False):  # fmt: skip
        super().__init__(encoder, modality, layer_decay, layerdrop or freeze_updates > 0, freeze_feature_encoder)
        if not hasattr(encoder, "maskable_features"):
            raise ValueError(f"{type(encoder).__name__} cannot be fine-tuned for speech recognition: it has no maskable_features")
        self.head = head
        self.fill = mask_fill if mask_fill is not None else MaskFill(head.linear.in_features)
        self.blank, self.freeze_updates = blank, freeze_updates
        self.num_updates = 0

    def load_encoder(self, state: dict[str, torch.Tensor], method=None) -> None:
        """The pretrained encoder, and the pretrained method's mask vector where it has one."""
        super().load_encoder(state)
        fill = method.mask_fill() if method is not None else None
        if fill is not None:
            self.fill.load_state_dict(fill.state_dict())

    def after_step(self, step: int) -> None:
        self.num_updates = step

    def logits(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               channel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Per-frame logits [B, N, V] and each utterance's frame count [B]."""
        frozen = self.num_updates < self.freeze_updates
        with torch.no_grad() if frozen else contextlib.nullcontext():
            x, padding = self.encoder.maskable_features(source, padding_mask)  # [B, N, D], [B, N]
            x = self.fill(x, mask, channel_mask)
            x = self.encoder.encode_features(x, padding)[:, self.modality.num_extra_tokens :]
        frames = x.shape[1]
        lengths = torch.full((x.shape[0],), frames, device=x.device) if padding is None else (~padding).sum(1)
        return self.head(x), lengths

    def forward(self, batch: dict) -> dict:
        """``logits`` [B, N, V] and ``lengths`` [B] of a batch and, with ``label``, the step's ``loss``.
        Prediction goes through here too, so that wrappers' forward hooks (FSDP2) run."""
        logits, lengths = self.logits(batch["source"], batch.get("padding_mask"), batch.get("mask"), batch.get("channel_mask"))
        out = {"logits": logits, "lengths": lengths}
        if "label" in batch:
            out["loss"] = ctc_loss(logits, lengths, batch["label"], batch["label_lengths"], self.blank)
        return out
