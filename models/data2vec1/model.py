"""data2vec 1.0: one masked view per sample, the student on every position, an EMA teacher.

Baevski, Hsu, Xu, Babu, Gu, Auli, "data2vec: A General Framework for Self-supervised Learning in
Speech, Vision and Language", ICML 2022 (arXiv:2202.03555). Reference code: fairseq
``examples/data2vec/models/data2vec_audio.py``, ``data2vec_text.py``, ``data2vec_vision.py`` (the
vision model is fairseq's re-implementation of ``facebookresearch/data2vec_vision``), configured by
``examples/data2vec/config/{audio,text,vision}/pretraining/*``; every behaviour below follows them.

One training step (``Data2Vec1.forward``), B samples with one mask each:

    feats   = local encoder(source)                      audio CNN / patch embedding   [B, N, D]
    student = feats with mask_emb at masked positions    (text: <mask> ids, embedded)  [B, N, D]
              -> positions (+ CLS) -> [input LN, dropout] -> blocks [-> final LN]
    pred    = head(student outputs)                      Linear (text: 2-layer MLP)    [B, N, D]
    teacher (no_grad, eval, unmasked) -> top-k FFN outputs (vision: block outputs)
    target  = layer_targets(...)                         audio IN->AVG, text LN->AVG, vision AVG->LN
    loss    = masked_regression_loss(pred, target, mask, clones=1)
    after the optimizer step: after_step(step) -> teacher <- EMA of the student (some parts copied)

Compared with data2vec 2.0 (``data2vec2``): the student runs on all N positions of a single mask
(a learned mask vector where data2vec 2.0 drops the tokens), there is no decoder, and the teacher
runs once per student pass instead of once per K.

What the teacher is (``ema_transformer_only`` / ``skip_keys`` of the reference models), set by the config's ``teacher_omits`` / ``teacher_copies``:
    audio   the transformer only (``ema_transformer_only``): conv positions copied each step
            (``ema_layers_only``), input LayerNorm and blocks averaged; fed the student's CNN
            features before masking.
    text    the whole encoder, its token/position embeddings and embedding LayerNorm copied each
            step; it embeds the original tokens itself (in eval mode: no embedding dropout).
    vision  the transformer, fed the student's patch embeddings with the student's CLS and positions.

Deliberate differences from the reference, documented where they live: masks arrive with the batch
with the same count in every row (``masking``); vision uses fixed sin-cos positions where fairseq's
re-implementation has BEiT's shared relative position bias (our attention has no bias table; see the
README); the teacher stays fp32 under autocast.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from d2v2.kernels.layer_targets import layer_targets
from d2v2.kernels.masked_regression_loss import masked_regression_loss

from ..data2vec2.model import Data2Vec2
from ..layers.blocks import PostNormBlock, PreNormBlock, TwoStageEncoder, forward_blocks, init_bert_params
from ..layers.embeddings import embed_paths
from ..layers.mask_fill import MaskFill
from ..layers.masking import beit_block_mask, mlm_span_mask, wav2vec_span_mask
from ..layers.teacher import ema_update, frozen_copy, weighted_std
from ..method import Method, check_mask
from ..modalities import MaskFunction, Modality, modality_for
from .config import DATA2VEC1_PRESETS, Data2Vec1Config, data2vec1_config

__all__ = [
    "Data2Vec1", "Data2Vec1Encoder", "Data2Vec1Config", "data2vec1_config", "DATA2VEC1_PRESETS", "masker_for",
    "standard_architecture",
]  # fmt: skip

_MASKERS = {
    "wav2vec_span": lambda cfg: partial(wav2vec_span_mask, mask_prob=cfg.mask_prob, span=cfg.mask_length,
                                        min_masks=cfg.min_masks),
    "mlm_span": lambda cfg: partial(mlm_span_mask, mask_prob=cfg.mask_prob, span=cfg.mask_length),
    "beit_block": lambda cfg: partial(beit_block_mask, num_masked=cfg.num_mask_patches,
                                      min_block=cfg.min_mask_patches, min_aspect=cfg.mask_min_aspect),
}  # fmt: skip


def masker_for(cfg: Data2Vec1Config) -> MaskFunction:
    """The config's mask algorithm as the modality's ``masker(rows, shape, generator=g)``."""
    return _MASKERS[cfg.masking](cfg)


class Data2Vec1Encoder(TwoStageEncoder):
    """Local encoder -> positions (+ CLS) -> [input LayerNorm, dropout] -> blocks -> [final LayerNorm].

    Roles: ``embed`` (the modality's embedding module: ``local_encoder`` and the positional parts,
    ``pos_conv`` for audio, ``pos_embed`` and ``cls_token`` for images; see ``embeddings``); ``input_norm`` / ``input_dropout`` are
    wav2vec 2.0's encoder LayerNorm and dropout (audio; identities otherwise); ``blocks`` are
    post-norm (audio, text) or BEiT's pre-norm blocks with layer-scale, then ``norm`` (vision).
    Teacher copies set the parts they do not own to None.

    Args:
        cfg: a ``Data2Vec1Config``.
        modality: the modality object that builds and runs the modality-specific parts.
    """

    def __init__(self, cfg: Data2Vec1Config, modality: Modality):
        super().__init__()
        self.modality = modality
        self.layerdrop = cfg.layerdrop
        self.collect = "block" if cfg.end_of_block_targets else "ffn"
        self.impl = cfg.impl
        dim = cfg.embed_dim
        self.embed = modality.build_embed(cfg)
        self.input_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.input_norm else nn.Identity()
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        drop_path = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        args = (dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.encoder_dropout, cfg.attention_dropout,
                cfg.activation_dropout, cfg.post_mlp_dropout)  # fmt: skip
        if cfg.layer_norm_first:
            self.blocks = nn.ModuleList(
                PreNormBlock(*args, rate, cfg.impl, layer_scale_init=cfg.layer_scale_init) for rate in drop_path
            )
            self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        else:
            self.blocks = nn.ModuleList(PostNormBlock(*args, rate, cfg.impl) for rate in drop_path)
            self.norm = nn.Identity()

    def local_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """source -> (features [B, N, D], token padding mask [B, N] or None)."""
        return self.embed.local_features(source, padding_mask)

    def contextualize(self, feats: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Features [B, N, D] -> (tokens [B, extra + N, D] for the blocks, their attention context)."""
        x, positions = self.embed(feats)
        context = {"positions": positions, "alibi_slopes": self.embed.alibi(), "key_padding_mask": padding_mask}
        return self.input_dropout(self.input_norm(x)), context

    def run_blocks(self, x: torch.Tensor, context: dict, collect_top: int = 0) -> tuple[torch.Tensor, list]:
        """The blocks and final norm: (output [B, L, D], the top ``collect_top`` blocks' FFN outputs or,
        with ``end_of_block_targets``, block outputs, bottom up)."""
        collect_from = len(self.blocks) - collect_top if collect_top > 0 else None
        x, layers = forward_blocks(self.blocks, x, **context, layerdrop=self.layerdrop, collect_from=collect_from,
                                   collect=self.collect)  # fmt: skip
        return self.norm(x), layers


class Data2Vec1(Method):
    """data2vec 1.0 for one modality: student encoder, mask vector, prediction head, EMA teacher, loss.

    Batch (made by the data loader): ``source``, optional ``padding_mask``, and ``mask`` bool [B, N]
    (True = masked; one mask per sample, ``modality.make_masks`` with clones=1). ``ids_keep`` is not
    needed: the student sees every position.

    Args:
        cfg: the model config (``data2vec1_config(modality, size)`` for a released preset).
    """

    embedded_encoders = ("encoder.", "teacher.")

    def __init__(self, cfg: Data2Vec1Config):
        super().__init__()
        self.cfg = cfg
        self.modality = modality_for(cfg, clones=1, masker=masker_for(cfg))
        self.encoder = Data2Vec1Encoder(cfg, self.modality)
        dim = cfg.embed_dim
        # The learned vector at masked positions (audio, vision); text masks its input ids instead.
        self.mask_emb = None if cfg.mask_fill == "token" else nn.Parameter(torch.empty(dim))
        if cfg.head_layers == 1:
            self.head = nn.Linear(dim, dim)  # final_proj
        else:
            self.head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))  # regression_head
        self.init_weights()
        self.teacher = self._make_teacher()
        self.num_updates = 0

    def init_weights(self) -> None:
        """The reference's init: BERT init (N(0, 0.02) Linear/Embedding, zero biases) over encoder and
        head, PyTorch's default for the audio feature projection and head (wav2vec 2.0 initialises only
        its transformer that way); mask vector U(0, 1) (audio) or trunc-normal 0.02 (vision). BEiT's
        blocks (``layer_norm_first``) also get BEiT's CLS init (trunc-normal 0.02) and its rescaling of
        each block's output projections by 1/sqrt(2 * layer)."""
        cfg = self.cfg
        self.encoder.apply(init_bert_params)
        self.head.apply(init_bert_params)
        self.modality.reset_init(self.encoder, None)
        with torch.no_grad():
            if cfg.mask_fill == "uniform":
                self.mask_emb.uniform_()
                for layer in self.head.modules():
                    if isinstance(layer, nn.Linear):
                        layer.reset_parameters()
            elif cfg.mask_fill == "normal":
                nn.init.trunc_normal_(self.mask_emb, std=0.02)
            if cfg.layer_norm_first:
                if getattr(self.encoder.embed, "cls_token", None) is not None:
                    nn.init.trunc_normal_(self.encoder.embed.cls_token, std=0.02)
                for layer, block in enumerate(self.encoder.blocks, start=1):
                    block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                    block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def _make_teacher(self) -> Data2Vec1Encoder:
        return frozen_copy(self.encoder, omit=embed_paths(self.cfg.teacher_omits))

    def reset_teacher(self) -> None:
        """Make the teacher a fresh copy of the student (e.g. after loading student weights)."""
        self.teacher = self._make_teacher().to(next(self.encoder.parameters()).device)

    @property
    def skips_parameters(self) -> bool:
        return self.cfg.layerdrop > 0

    def train(self, mode: bool = True) -> "Data2Vec1":
        """As nn.Module.train, but the teacher always stays in eval mode (no dropout/LayerDrop)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- the training step ----------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict:
        """One data2vec 1.0 step on ``batch`` (see the class docstring).

        Returns ``loss`` (scalar fp32, differentiable), ``target_var`` and ``pred_var`` (detached: mean
        over channels of the per-channel std over the masked positions), ``ema_decay`` (float) and
        ``sample_size`` (masked positions, a 0-dim tensor: no host sync).
        """
        cfg = self.cfg
        source, padding_mask = batch["source"], batch.get("padding_mask")
        mask = check_mask(batch, source.shape[0], 1, self.modality.num_positions(source)).to(source.device)
        if self.mask_emb is None:  # text: the student embeds <mask> ids at the masked positions
            clean = None
            feats, padding_mask = self.encoder.local_features(source.masked_fill(mask, cfg.mask_token), padding_mask)
        else:  # audio, vision: the learned vector replaces the local features at the masked positions
            clean, padding_mask = self.encoder.local_features(source, padding_mask)
            feats = torch.where(mask[..., None], self.mask_emb.to(clean.dtype), clean)
        x, context = self.encoder.contextualize(feats, padding_mask)
        x, _ = self.encoder.run_blocks(x, context)
        pred = self.head(x[:, cfg.num_extra_tokens :])  # [B, N, D]

        with torch.no_grad():
            target = self.teacher_targets(source, None if clean is None else clean.detach(), padding_mask)

        loss = masked_regression_loss(pred, target, mask, clones=1, scale=cfg.loss_scale, beta=cfg.loss_beta,
                                      impl=cfg.impl)  # fmt: skip
        with torch.no_grad():  # weighted moments over the masked positions: no host sync
            out = {"target_var": weighted_std(target, mask), "pred_var": weighted_std(pred, mask)}
        out["loss"] = loss
        out["ema_decay"] = self.ema_decay(self.num_updates)
        out["sample_size"] = mask.sum()
        return out

    @torch.no_grad()
    def teacher_targets(
        self, source: torch.Tensor, feats: torch.Tensor | None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Regression targets [B, N, D] fp32 from the teacher's top-k layers, on the unmasked input.

        Args:
            source: the batch's source (the text teacher embeds it itself).
            feats: the student's local features before masking [B, N, D] (audio, vision teachers
                start from them); None when the teacher owns its local encoder.
            padding_mask: token padding [B, N] or None.
        """
        cfg = self.cfg
        if self.teacher.embed.local_encoder is not None:
            feats, padding_mask = self.teacher.local_features(source, padding_mask)
        x, context = self.teacher.contextualize(feats, padding_mask)
        _, layers = self.teacher.run_blocks(x, context, collect_top=cfg.average_top_k_layers)
        layers = [layer[:, cfg.num_extra_tokens :] for layer in layers]  # drop CLS: [B, N, D] each
        return layer_targets(layers, per_layer=cfg.target_layer_norm, final=cfg.target_final_norm, impl=cfg.impl)


    # -- EMA, health ------------------------------------------------------------------------------------

    ema_decay = Data2Vec2.ema_decay  # the same annealed schedule (fairseq get_annealed_rate)
    health = Data2Vec2.health  # stop on collapsed target / prediction std after 5,000 updates

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Update the teacher after optimizer update number ``step``: with tau = ema_decay(step) < 1,
        tau * teacher + (1 - tau) * student for the averaged parameters; the ``teacher_copies`` parts,
        untrained parameters and buffers are copied. tau = 1 freezes the teacher (no copies either, as
        the reference skips the whole EMA step). Repeated calls for one step are ignored."""
        if step == self.num_updates:
            return
        self.num_updates = step
        decay = self.ema_decay(step)
        if decay < 1.0:
            ema_update(self.teacher, self.encoder, decay, impl=self.cfg.impl, copy=embed_paths(self.cfg.teacher_copies))

    # -- features, optimizer ---------------------------------------------------------------------------

    def mask_fill(self) -> MaskFill | None:
        """Fine-tuning's time masks take this method's mask vector, in spans of at least 2 (fairseq
        ``Data2VecAudioModel.apply_mask``); text, which masks its input ids, has none."""
        if self.mask_emb is None:
            return None
        return MaskFill(self.cfg.embed_dim, self.mask_emb, min_spans=2)

    @torch.no_grad()
    def probe_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's final outputs on the unmasked input, [B, N, D] (CLS left out)."""
        owner = self.encoder if self.teacher.embed.local_encoder is None else self.teacher
        feats, padding_mask = owner.local_features(source, padding_mask)
        x, context = self.teacher.contextualize(feats, padding_mask)
        return self.teacher.run_blocks(x, context)[0][:, self.cfg.num_extra_tokens :]

    def no_weight_decay(self) -> set[str]:
        """Every 1-D student parameter (norms, biases, mask vector, layer-scales), every ``.bias``, and
        the fixed image positions."""
        return {
            name
            for name, p in self.named_parameters()
            if not name.startswith("teacher.") and (p.dim() <= 1 or name.endswith((".bias", "pos_embed")))
        }


def standard_architecture(cfg: Data2Vec1Config) -> tuple[str | None, str]:
    """The standard class this encoder is, for export (a name of ``engine.interop.standard_targets``),
    or (None, why not)."""
    if cfg.modality == "text":
        return "data2vec-text", "RoBERTa's encoder"
    if cfg.modality == "audio":
        if cfg.layer_norm_first or not cfg.input_norm or cfg.alibi or cfg.norm_eps != 1e-5:
            return None, ("its config leaves data2vec 1.0 audio's architecture (pre-norm, no input LayerNorm, "
                          "ALiBi or norm_eps != 1e-5)")  # fmt: skip
        return "data2vec-audio", "wav2vec 2.0's encoder with 5 conv position layers"
    if not cfg.layer_norm_first:
        return None, "post-norm vision blocks (layer_norm_first false) have no BEiT counterpart"
    return "data2vec-vision", "BEiT's pre-norm layer-scale blocks with absolute positions"
