"""data2vec 2.0: one student-teacher model for images, speech and text, on d2v2's kernels.

Baevski, Babu, Hsu, Auli, "Efficient Self-supervised Learning with Contextualized Target
Representations for Vision, Speech and Language", ICML 2023 (arXiv:2212.07525). Reference code:
fairseq ``examples/data2vec/models/data2vec2.py: Data2VecMultiModel`` and
``examples/data2vec/models/modalities/*``, configured by ``examples/data2vec/config/v2/*``; every
behaviour and number below follows them ("quirk" marks a reference behaviour kept as it is).

One training step (``Data2Vec2.forward``), B samples with K masks (clones) each:

    feats   = local encoder(source)                    once per sample               [B, N, D]
    student = gather_tokens(feats, ids_keep, pos, K)   kept tokens of every clone     [B*K, k, D]
              (+ CLS for images) -> prenet LN/dropout/blocks -> shared blocks
    pred    = decoder(student outputs)                 noise at masked positions      [B*K, N, D]
    teacher (no_grad, eval, once per sample, unmasked) -> FFN outputs of its top-k shared blocks
    target  = layer_targets(...)                       per-layer norm, average, final  [B, N, D] fp32
    loss    = masked_regression_loss(pred, target, mask, clones=K)   (+ CLS loss, images)
    after the optimizer step: after_step(step) -> teacher <- EMA of the student

Targets are built for the B samples and indexed per clone (row r uses sample r // K); they are never
repeated K times. The student never sees a masked token: attention runs on k << N tokens.

What the teacher is (``Data2VecMultiModel.make_ema_teacher``, ``ema_encoder_only``):
    images  a full EMA copy of the encoder: patch embedding, CLS, fixed positions, prenet, blocks; it
            embeds the raw image itself.
    audio   an EMA copy without the CNN: conv positional encoder, prenet, ALiBi scales, blocks; it is
            fed the student's CNN features (computed once, detached).
    text    only the shared blocks, fed the student's embedding output (which, as in the reference,
            has the training-mode embedding dropout applied: a quirk kept).

The CLS loss (images, weight 0.01, ``cls_loss`` in ``Data2VecMultiModel.forward``). The reference multiplies the per-row CLS error by the
number of masked positions before its criterion sums all terms and divides by that number, so the
CLS term ends up *summed* over the B*K rows of a device (a quirk kept). Our loss is normalised by
the number of masked positions, so we write the same quantity directly:

    loss = mean over masked (r, n) of sum_d (pred - target)^2 * s
         + cls_loss * sum over rows r of sum_d (cls_pred[r] - mean_n target[r // K, n])^2 * s

with s = 1/sqrt(D). It is the reference's per-device objective exactly; with data parallelism the
gradient average over ranks (each with the same number of masked positions, which inverse block
masking guarantees) reproduces the reference's global normalisation, and so does dividing each
micro-batch's loss by the accumulation count. The CLS weight therefore scales with the per-device
batch B*K, as in the reference.

Deliberate differences from the reference, all documented where they live:
    - masks arrive with the batch (the reference also precomputes image/audio masks in the loader;
      text masks are made there too instead of on the GPU from hashed ids);
    - no fp16 teacher copy (the reference keeps an fp16 EMA teacher under fp16 training): the teacher stays fp32 and autocast runs its matmuls in
      bf16; the EMA is fp32 arithmetic, as the reference's fp32 master copy;
    - drop path, 0 in every preset, is spaced linearly over prenet + shared blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from d2v2.kernels.layer_targets import layer_targets
from d2v2.kernels.masked_regression_loss import masked_regression_loss

from ..layers.blocks import init_bert_params
from ..layers.mask_fill import MaskFill
from ..layers.teacher import ema_decay_schedule, ema_update, frozen_copy, std_within_samples, weighted_std
from ..method import Method, batch_masks
from ..modalities import modality_for
from .config import DATA2VEC2_PRESETS, Data2Vec2Config, data2vec2_config
from .encoder import Data2Vec2Encoder

__all__ = [
    "Data2Vec2", "Data2Vec2Config", "Data2Vec2Encoder", "data2vec2_config", "DATA2VEC2_PRESETS",
    "standard_architecture",
]  # fmt: skip

# The reference checks for collapsed variances only after this many updates (``min_target_var``
# in ``Data2VecMultiModel.forward``).
VARIANCE_CHECK_AFTER = 5000


class Data2Vec2(Method):
    """data2vec 2.0 for one modality: student encoder, conv decoder, EMA teacher and the loss.

    A ``Method`` (see ``method``): ``forward(batch) -> dict`` with ``loss`` and logged values,
    ``after_step(step)`` for the EMA update, ``health`` for the variance-collapse stop.

    Batch (made by the data loader):
        ``source``: images [B, C, H, W] float, waveforms [B, T] float, or token ids [B, L] long;
        ``padding_mask`` (optional, audio and text): bool [B, T] / [B, L], True = padding;
        ``mask``: bool [B*K, N], True = masked, clone-major (rows i*K .. i*K+K-1 are sample i's masks),
            the same number of masked positions in every row (``modality.make_masks`` makes them);
        ``ids_keep`` (optional): int [B*K, k], the sorted kept positions of each row; derived from
            ``mask`` when absent (one host sync: make it in the loader with ``masking.mask_to_ids``).
            Its range is checked once here (on the CPU, or on the device without a host sync), so the
            kernels are told to skip their own checks.

    Submodules: ``encoder`` (the student's ``Data2Vec2Encoder``), ``decoder`` (``Decoder2d`` or
    ``Decoder1d``) and ``teacher`` (a pruned copy of the encoder, never trained by the optimizer: its
    parameters have requires_grad=False and it always stays in eval mode). Optimizers should take
    ``param_groups(weight_decay)``, which lists only the student's trainable parameters.

    Args:
        cfg: the model config (``data2vec2_config(modality, size)`` for a released preset).
    """

    embedded_encoders = ("encoder.", "teacher.")
    log_keys = ("local_std",)
    """Logged beside the variances: the local features' std within each sample (``std_within_samples``),
    the early sign of a collapsing CNN or patch embedding."""

    def __init__(self, cfg: Data2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.modality = modality_for(cfg)
        self.encoder = Data2Vec2Encoder(cfg, self.modality)
        self.decoder = self.modality.build_decoder(cfg)
        self.init_weights()
        self.teacher = self._make_teacher()
        self.num_updates = 0

    # -- construction ---------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """The reference's init: BERT init (N(0, 0.02) Linear/Embedding, zero biases) over the student,
        then PyTorch's default init again for the decoder head (images, audio) and the audio feature
        projection (``Data2VecMultiModel.__init__``, ``modalities/modules.py: Decoder1d``). Convolutions, the CLS token and the ALiBi scales keep their own."""
        self.encoder.apply(init_bert_params)
        self.decoder.apply(init_bert_params)
        self.modality.reset_init(self.encoder, self.decoder)

    @property
    def skips_parameters(self) -> bool:
        return self.cfg.layerdrop > 0 or self.cfg.prenet_layerdrop > 0

    def _make_teacher(self) -> Data2Vec2Encoder:
        return frozen_copy(self.encoder, omit=self.modality.teacher_omits)

    def reset_teacher(self) -> None:
        """Make the teacher a fresh copy of the student (e.g. after loading student weights)."""
        self.teacher = self._make_teacher().to(next(self.encoder.parameters()).device)

    def train(self, mode: bool = True) -> "Data2Vec2":
        """As nn.Module.train, but the teacher always stays in eval mode (no dropout/LayerDrop)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- the training step ----------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict:
        """One data2vec 2.0 step on ``batch`` (see the class docstring).

        Returns a dict: ``loss`` (scalar fp32, differentiable), ``loss_regression`` and, for images,
        ``loss_cls`` (detached), ``target_var`` and ``pred_var`` (detached 0-dim tensors: mean over
        channels of the per-channel std over all masked tokens, as the reference's ``compute_var``), ``ema_decay``
        (float, the decay at the last ``after_step``, as the reference logs it) and ``sample_size``
        (int, masked positions).
        Logged values are tensors, so reading them is the caller's (one) sync.
        """
        cfg = self.cfg
        clones = self.modality.clones  # K: the loader's masks come from the same object
        source = batch["source"]
        feats, padding_mask = self.encoder.local_features(source, batch.get("padding_mask"), cfg.local_grad_mult)
        batch_size, length, dim = feats.shape
        mask, ids_keep = batch_masks(batch, batch_size, clones, length, feats.device)
        num_kept = ids_keep.shape[1]
        extra = cfg.num_extra_tokens

        # Student: the kept tokens of every clone only.
        # ids_keep was validated by batch_masks: the kernels skip their range checks (host syncs).
        x, context = self.encoder.contextualize(feats, padding_mask, mask, ids_keep, clones, check_ids=False)
        x, _ = self.encoder.run_blocks(x, context)  # [B*K, extra + k, D]
        pred = self.decoder(x[:, extra:], ids_keep, length, check_ids=False)  # [B*K, N, D]

        # Teacher: once per sample, unmasked.
        with torch.no_grad():
            target = self.teacher_targets(source, feats.detach(), padding_mask)  # [B, N, D] fp32

        loss_regression = masked_regression_loss(
            pred, target, mask, clones=clones, scale=cfg.loss_scale, beta=cfg.loss_beta, impl=cfg.impl
        )
        out = {"loss_regression": loss_regression.detach()}
        loss = loss_regression
        if cfg.cls_loss > 0:
            cls_pred = x[:, 0].float().view(batch_size, clones, dim)  # [B, K, D]
            cls_target = target.mean(dim=1)[:, None, :]  # [B, 1, D], shared by the sample's clones
            loss_cls = cfg.cls_loss * self._elementwise_loss(cls_pred, cls_target).sum() * self._loss_scale()
            out["loss_cls"] = loss_cls.detach()
            loss = loss + loss_cls

        with torch.no_grad():
            # A target position counts as many times as clones mask it; the target is never repeated.
            out["target_var"] = weighted_std(target, mask.view(batch_size, clones, length).sum(dim=1))
            out["pred_var"] = weighted_std(pred, mask)
            out["local_std"] = std_within_samples(feats, padding_mask)
        out["loss"] = loss
        out["ema_decay"] = self.ema_decay(self.num_updates)
        out["sample_size"] = batch_size * clones * (length - num_kept)
        return out

    @torch.no_grad()
    def teacher_targets(
        self, source: torch.Tensor, feats: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Regression targets [B, N, D] fp32 from the teacher's top-k FFN outputs (``Data2VecMultiModel.make_targets``).

        Args:
            source: the batch's source (the image teacher embeds it itself).
            feats: the student's local features [B, N, D] (audio, text teachers start from them).
            padding_mask: token padding [B, N] or None.
        """
        cfg = self.cfg
        x, context = self.modality.teacher_tokens(self.teacher, self.encoder, source, feats, padding_mask)
        _, layers = self.teacher.run_blocks(x, context, collect_top=cfg.average_top_k_layers)
        extra = cfg.num_extra_tokens
        layers = [layer[:, extra:] for layer in layers]  # drop CLS: [B, N, D] each
        return layer_targets(layers, per_layer=cfg.target_layer_norm, final=cfg.target_final_norm, impl=cfg.impl)

    def _loss_scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.embed_dim) if self.cfg.loss_scale is None else float(self.cfg.loss_scale)

    def _elementwise_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element squared error (loss_beta = 0) or smooth-L1 with loss_beta, in fp32, broadcasting."""
        if self.cfg.loss_beta == 0:
            return (pred.float() - target.float()).square()
        pred, target = torch.broadcast_tensors(pred.float(), target.float())
        return F.smooth_l1_loss(pred, target, reduction="none", beta=self.cfg.loss_beta)

    # -- EMA ------------------------------------------------------------------------------------------

    def ema_decay(self, step: int) -> float:
        """The teacher decay after ``step`` optimizer updates (a pure function of the step)."""
        cfg = self.cfg
        return ema_decay_schedule(step, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Update the teacher after optimizer update number ``step`` (1 after the first update).

        With tau = ema_decay(step) < 1: every teacher parameter whose student twin trains becomes
        tau * teacher + (1 - tau) * student (``kernels.ema``, fp32 arithmetic); parameters the student
        does not train (the fixed image positions) and buffers are copied. With tau = 1 nothing changes
        (the teacher is frozen). A repeated call for the same step is ignored, so the update fires
        once per optimizer step, as the reference guards it.
        """
        if step == self.num_updates:
            return
        self.num_updates = step
        decay = self.ema_decay(step)
        if decay < 1.0:
            ema_update(self.teacher, self.encoder, decay, impl=self.cfg.impl)

    def health(self, step: int, metrics: dict) -> str | None:
        """Why training must stop (the reference's ``min_target_var`` / ``min_pred_var``: after 5,000 updates, target std < min_target_var or
        prediction std < min_pred_var), or None. Called on logging steps with the logged values."""
        if step <= VARIANCE_CHECK_AFTER:
            return None
        target_var, pred_var = metrics["target_var"], metrics["pred_var"]
        fix = "the representations collapsed; lower optim.lr, or raise model.ema_decay"
        if target_var < self.cfg.min_target_var:
            return f"target variance {target_var:.4g} < min_target_var {self.cfg.min_target_var} at step {step}: {fix}"
        if pred_var < self.cfg.min_pred_var:
            return f"prediction variance {pred_var:.4g} < min_pred_var {self.cfg.min_pred_var} at step {step}: {fix}"
        return None

    # -- features, optimizer ---------------------------------------------------------------------------

    def mask_fill(self) -> MaskFill:
        """Fine-tuning's time masks fill with N(0, mask_noise_std^2) noise, in spans of at least 1: the
        reference's fine-tuning sets ``encoder_zero_mask`` false (``zero_mask``) and ``compute_mask``
        passes ``min_masks=1``; data2vec 2.0 has no learned mask vector."""
        return MaskFill(self.cfg.embed_dim, noise_std=self.cfg.mask_noise_std, min_spans=1)

    @torch.no_grad()
    def probe_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's final outputs on the unmasked input, [B, N, D] (CLS left out): what the
        reference evaluates. The audio and text teachers start from the student's local features."""
        feats, padding_mask = self.encoder.local_features(source, padding_mask)
        x, context = self.modality.teacher_tokens(self.teacher, self.encoder, source, feats, padding_mask)
        return self.teacher.run_blocks(x, context)[0][:, self.modality.num_extra_tokens :]

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters excluded from weight decay, as the reference tags them: every 1-D
        parameter (norms, biases, ALiBi scales), every ``.bias``, the ALiBi scales, plus the fixed image
        positions (not trained at all). The CLS token [1, 1, D] is decayed, as in the reference."""
        names = set()
        for name, param in self.named_parameters():
            if name.startswith("teacher."):
                continue
            if param.dim() <= 1 or name.endswith(".bias") or "alibi_scale" in name or name.endswith("pos_embed"):
                names.add(name)
        return names


def standard_architecture(cfg: Data2Vec2Config) -> tuple[str | None, str]:
    """The standard class this encoder is, for export (a name of ``engine.interop.standard_targets``),
    or (None, why not)."""
    if cfg.modality == "text":
        if cfg.prenet_depth > 0:
            return None, "its prenet (a LayerNorm and blocks after the embedding LayerNorm) has no RoBERTa counterpart"
        return "data2vec-text", "no prenet: RoBERTa's encoder"
    if cfg.modality == "image":
        return None, "its blocks are post-norm after a LayerNorm on the embeddings; timm's and HF's ViTs are pre-norm"
    return None, "its attention has a learned-scale ALiBi bias, which no HF or timm audio model has"
