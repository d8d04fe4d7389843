"""wav2vec 2.0 (speech) as a d2v2 method: the contrastive baseline data2vec 2.0 compares against.

One training step (fairseq ``fairseq/models/wav2vec/wav2vec2.py: Wav2Vec2Model``)::

    f      = CNN(wave)                   [B, N, 512]  "default" mode; gradients into it x feature_grad_mult
    pen    = mean(f ** 2)                             the L2 feature penalty
    f      = LayerNorm(f)
    u      = dropout_features(f)                      the unmasked copy the targets come from
    x      = dropout_input(Linear(f))    [B, N, D]
    x[m]   = mask_emb                                 wav2vec span masks (made by the data loader)
    x      = blocks(dropout(LayerNorm(x + pos_conv(x))))   post-norm, LayerDrop, ALL frames
    c      = final_proj(x[m])            [B, M, 256]  the M masked frames of each utterance
    q      = project_q(quantise(u[m]))   [B, M, 256]  Gumbel product quantiser (``quantizer``)
    logits = cos(c, [q_pos, q_neg_1..K]) / kappa      K distractors from the utterance's other masked
                                                      frames; those identical to q_pos get -inf
    loss   = CE(logits, 0) summed over the B*M masked frames / (B*M)
             + diversity_weight * (G V - perplexity) / (G V) + feature_penalty * pen

The division by B*M is fairseq's ``sample_size`` normalisation (its criterion sums the cross-entropy,
scales the extra losses by sample_size, and its trainer divides the gradient by sample_size), so
the loss the trainer sees is the per-masked-frame cross-entropy plus the weighted extra losses.

Speed: nothing loops over samples or frames. Every utterance masks the same number of frames
(``masking.wav2vec_span_mask`` equalises the counts), so the masked frames, the targets and the
distractors are dense [B, M, ...] gathers; the distractor indices are drawn on the device and the
identical-distractor test compares code indices, so the step makes no host sync.

Limits: batches with padding run (key padding in attention, padded frames zeroed before the
positional conv), but the masks and distractors are drawn over the full length, padded frames
included; the data loader crops every batch to its shortest clip, so it makes no padding.

References: wav2vec 2.0, Baevski et al., NeurIPS 2020 (arXiv:2006.11477); fairseq
``fairseq/models/wav2vec/wav2vec2.py``, ``fairseq/criterions/wav2vec_criterion.py``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from d2v2.kernels.gather_tokens import gather_tokens

from ..layers.blocks import PostNormBlock, forward_blocks, init_bert_params
from ..layers.encoders import AudioFeatureEncoder, WeightNormConvPositions, frame_padding_mask
from ..layers.grad import grad_multiply
from ..layers.mask_fill import MaskFill
from ..layers.masking import mask_to_ids, wav2vec_span_mask
from ..layers.quantizer import GumbelVectorQuantizer
from ..method import Method, check_mask
from ..modalities import modality_for
from .config import WAV2VEC2_PRESETS, Wav2Vec2Config, wav2vec2_config

__all__ = [
    "Wav2Vec2", "Wav2Vec2Config", "Wav2Vec2Encoder", "wav2vec2_config", "WAV2VEC2_PRESETS", "sample_negatives",
    "contrastive_logits", "grad_multiply", "standard_architecture",
]  # fmt: skip


class Wav2Vec2Encoder(nn.Module):
    """The wav2vec 2.0 encoder: CNN, feature projection, mask embedding, conv positions, post-norm blocks.

    ``forward(source, padding_mask)`` runs it unmasked: [B, N, D] (what export and probes use); the
    method runs its parts (``local_features``, ``project``, ``contextualize``) to mask in between.

    Args:
        cfg: the model config.

    Submodules: ``local_encoder`` (``AudioFeatureEncoder``: CNN, ``project_norm`` LayerNorm(C),
    ``project`` Linear(C -> D)), ``dropout_input``, ``mask_emb`` [D] (U(0, 1)), ``pos_conv``,
    ``norm`` (LayerNorm(D) after the positions), ``dropout``, ``blocks``. Init as the reference:
    the blocks BERT-init (fairseq's ``TransformerEncoder`` applies ``init_bert_params`` to itself),
    the CNN kaiming-normal, everything else PyTorch's default.
    """

    masking_only = ("mask_emb",)
    """Parameters only a masked input uses (none of them is trained when fine-tuning without masks)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.local_encoder = AudioFeatureEncoder(dim, cfg.conv_feature_layers, mode=cfg.extractor_mode)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.mask_emb = nn.Parameter(torch.rand(dim))
        self.pos_conv = WeightNormConvPositions(dim, cfg.conv_pos_kernel, cfg.conv_pos_groups)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.encoder_dropout)
        self.blocks = nn.ModuleList(
            PostNormBlock(
                dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, encoder_dropout=cfg.encoder_dropout,
                attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
                post_mlp_dropout=cfg.encoder_dropout, impl=cfg.impl,
            )
            for _ in range(cfg.depth)
        )  # fmt: skip
        self.blocks.apply(init_bert_params)

    def local_features(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """waveforms [B, T] -> (CNN output [B, N, C], frame padding [B, N] or None)."""
        feats = self.local_encoder.features(source)
        if padding_mask is None:
            return feats, None
        return feats, frame_padding_mask(padding_mask, feats.shape[1], self.local_encoder.conv_spec)

    def project(self, normed: torch.Tensor) -> torch.Tensor:
        """LayerNorm-ed CNN features [B, N, C] -> dropout_input(Linear) [B, N, D]."""
        return self.dropout_input(self.local_encoder.project(normed))

    def contextualize(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] (masked or not) -> the last block's output [B, N, D]: positions added, LayerNorm,
        dropout, the blocks with LayerDrop and key padding."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = self.dropout(self.norm(x + self.pos_conv(x)))
        x, _ = forward_blocks(self.blocks, x, key_padding_mask=padding_mask, layerdrop=self.cfg.layerdrop)
        return x

    def maskable_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """The features ``mask_emb`` replaces: the projected CNN features [B, N, D] and their padding."""
        feats, padding_mask = self.local_features(source, padding_mask)
        return self.project(self.local_encoder.project_norm(feats)), padding_mask

    def encode_features(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(Masked) projected features [B, N, D] -> the last block's output [B, N, D]."""
        return self.contextualize(x, padding_mask)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_features(*self.maskable_features(source, padding_mask))


class Wav2Vec2(Method):
    """wav2vec 2.0 pretraining (speech): see the module docstring for the step.

    Batch (made by the data loader): ``source`` waveforms [B, T]; ``padding_mask`` (optional) bool
    [B, T]; ``mask`` bool [B, N], True = masked, the same count M >= 2 in every row (one mask per
    utterance: the modality has clones=1 and wav2vec 2.0's span masker); ``ids_keep`` (optional)
    [B, N - M], only its shape is read (it gives M without a host sync).

    Submodules: ``encoder`` (``Wav2Vec2Encoder``), ``quantizer`` (``GumbelVectorQuantizer``),
    ``project_q`` Linear(latent_dim -> final_dim), ``final_proj`` Linear(D -> final_dim),
    ``dropout_features``.

    Args:
        cfg: the model config (``wav2vec2_config("audio", size)`` for a preset).
    """

    log_keys = ("loss_contrastive", "loss_diversity", "loss_features", "prob_perplexity", "code_perplexity",
                "temperature", "accuracy")  # fmt: skip

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        masker = partial(wav2vec_span_mask, mask_prob=cfg.mask_prob, span=cfg.mask_length, min_masks=cfg.mask_min_spans)
        self.modality = modality_for(cfg, clones=1, masker=masker)
        self.encoder = Wav2Vec2Encoder(cfg)
        channels = self.encoder.local_encoder.conv_spec[-1][0]
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        self.quantizer = GumbelVectorQuantizer(
            channels, cfg.latent_vars, cfg.latent_groups, cfg.latent_dim, cfg.max_temp, cfg.min_temp, cfg.temp_decay
        )
        self.project_q = nn.Linear(cfg.latent_dim, cfg.final_dim)
        self.final_proj = nn.Linear(cfg.embed_dim, cfg.final_dim)

    @property
    def skips_parameters(self) -> bool:
        return self.cfg.layerdrop > 0

    def forward(self, batch: dict) -> dict:
        """One wav2vec 2.0 step on ``batch`` (see the class docstring).

        Returns a dict: ``loss`` (scalar fp32, differentiable; per masked frame, see the module
        docstring), and detached: ``loss_contrastive`` (mean cross-entropy), ``loss_diversity`` and
        ``loss_features`` (unweighted), ``prob_perplexity``, ``code_perplexity``, ``temperature``,
        ``accuracy`` (fraction of masked frames whose positive scores highest), and ``sample_size``
        (int, B * M masked frames).
        """
        cfg, encoder = self.cfg, self.encoder
        feats, padding_mask = encoder.local_features(batch["source"], batch.get("padding_mask"))
        feats = grad_multiply(feats, cfg.feature_grad_mult)  # [B, N, C]
        loss_features = feats.float().square().mean()
        batch_size, length, _ = feats.shape
        mask, masked_ids = self._masked_frames(batch, batch_size, length, feats.device)  # [B, N], [B, M]
        num_masked = masked_ids.shape[1]

        normed = encoder.local_encoder.project_norm(feats)
        x = encoder.project(normed)  # [B, N, D]
        x = torch.where(mask[..., None], encoder.mask_emb.to(x.dtype), x)
        x = encoder.contextualize(x, padding_mask)  # [B, N, D]
        # masked_ids come from an argsort of the mask: in range, so the kernels skip their checks.
        pred = self.final_proj(gather_tokens(x, masked_ids, impl=cfg.impl, check_ids=False))  # [B, M, F]

        unmasked = gather_tokens(normed, masked_ids, impl=cfg.impl, check_ids=False)  # [B, M, C]
        quantised = self.quantizer(self.dropout_features(unmasked))
        targets = self.project_q(quantised["x"])  # [B, M, F]

        negatives = sample_negatives(batch_size, num_masked, cfg.num_negatives, feats.device)  # [B, M, K]
        logits = contrastive_logits(pred, targets, quantised["codes"], negatives, cfg.logit_temp)  # [B, M, 1+K]
        flat = logits.flatten(0, 1)  # [B*M, 1+K]
        positive = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        loss_contrastive = F.cross_entropy(flat, positive, reduction="sum") / flat.shape[0]
        loss_diversity = self.quantizer.diversity_loss(quantised["prob_perplexity"])
        loss = loss_contrastive + cfg.diversity_weight * loss_diversity + cfg.feature_penalty * loss_features

        with torch.no_grad():
            accuracy = (flat.argmax(dim=-1) == 0).float().mean()
        return {
            "loss": loss,
            "loss_contrastive": loss_contrastive.detach(),
            "loss_diversity": loss_diversity.detach(),
            "loss_features": loss_features.detach(),
            "prob_perplexity": quantised["prob_perplexity"].detach(),
            "code_perplexity": quantised["code_perplexity"],
            "temperature": self.quantizer.temperature.clone(),  # after_step changes it in place
            "accuracy": accuracy,
            "sample_size": batch_size * num_masked,
        }

    def _masked_frames(
        self, batch: dict, batch_size: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [B, N] on ``device``, masked positions [B, M] ascending) without a host sync when
        the loader's ``ids_keep`` gives M."""
        mask = check_mask(batch, batch_size, 1, length)
        ids_keep = batch.get("ids_keep")
        num_kept = mask_to_ids(mask).shape[1] if ids_keep is None else ids_keep.shape[1]  # the former syncs
        num_masked = length - num_kept
        if num_masked < 2:
            raise ValueError(
                f"wav2vec 2.0 needs at least 2 masked frames per utterance (a positive and a distractor), got "
                f"{num_masked} of {length}; use longer clips or a larger mask_prob"
            )
        mask = mask.to(device, non_blocking=True)
        # A stable sort puts each row's masked positions first, in ascending order.
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
        return mask, order[:, :num_masked]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Anneal the quantiser's temperature to its value after optimizer update ``step``."""
        self.quantizer.set_num_updates(step)

    def mask_fill(self) -> MaskFill:
        """Fine-tuning's time masks take the encoder's mask vector, in spans of at least 2 (fairseq
        ``Wav2Vec2Model.apply_mask``: ``min_masks=2``)."""
        return MaskFill(self.cfg.embed_dim, self.encoder.mask_emb, min_spans=2)

    def no_weight_decay(self) -> set[str]:
        """Nothing: the base recipe's plain fairseq ``adam`` decays every parameter (norms, biases,
        the mask embedding and the codebook included)."""
        return set()


def sample_negatives(
    batch_size: int, num_masked: int, num_negatives: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Distractor indices [B, M, K] into each utterance's M masked frames: for frame m, K draws with
    replacement, uniform over the other M - 1 frames (never m itself), as fairseq's
    ``sample_negatives`` (draw from [0, M - 1), shift the draws >= m up by one). Drawn on ``device``."""
    shape = (batch_size, num_masked, num_negatives)
    draws = torch.randint(0, num_masked - 1, shape, device=device, generator=generator)
    own = torch.arange(num_masked, device=device)[None, :, None]  # [1, M, 1]
    return draws + (draws >= own).long()


def contrastive_logits(
    pred: torch.Tensor, targets: torch.Tensor, codes: torch.Tensor, negatives: torch.Tensor, logit_temp: float
) -> torch.Tensor:
    """InfoNCE logits [B, M, 1 + K] (fp32): the cosine similarity of each prediction to its own target
    (index 0) and to the K distractor targets, divided by ``logit_temp``; a distractor identical to the
    positive (the same code in every group) gets -inf.

    Args:
        pred: [B, M, F] predictions at the masked frames.
        targets: [B, M, F] quantised targets at the masked frames.
        codes: [B, M, G] the codes each target was made of.
        negatives: [B, M, K] distractor indices into the M frames of the same utterance.
        logit_temp: kappa.
    """
    batch_size, num_masked, _ = targets.shape
    # Normalise once, then gather: the cosine of every pair is a dot product.
    pred = F.normalize(pred.float(), dim=-1, eps=1e-8)
    targets = F.normalize(targets.float(), dim=-1, eps=1e-8)
    flat = negatives + torch.arange(batch_size, device=negatives.device)[:, None, None] * num_masked  # [B, M, K]
    distractors = targets.flatten(0, 1)[flat]  # [B, M, K, F]
    positive = (pred * targets).sum(dim=-1, keepdim=True)  # [B, M, 1]
    negative = torch.einsum("bmf,bmkf->bmk", pred, distractors)  # [B, M, K]
    same = (codes.flatten(0, 1)[flat] == codes[:, :, None, :]).all(dim=-1)  # [B, M, K]
    negative = negative.masked_fill(same, float("-inf"))
    return torch.cat([positive, negative], dim=-1) / logit_temp


def standard_architecture(cfg: Wav2Vec2Config) -> tuple[str | None, str]:
    """The standard class this encoder is, for export: HF's wav2vec 2.0, or (None, why not)."""
    if cfg.norm_eps != 1e-5:
        return None, f"norm_eps {cfg.norm_eps}: HF's feature projection LayerNorm shares it, d2v2's uses 1e-5"
    return "wav2vec2", "wav2vec 2.0's encoder"
