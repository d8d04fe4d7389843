"""The modality embeddings: the modules that turn a source into the tokens the transformer blocks see.

Each is an ``nn.Module`` that declares every parameter it owns in its ``__init__`` (timm's rule) and
runs in two steps, because data2vec 2.0 runs the local encoder once per sample and adds positions
once per masked copy (paper section 3, "Efficient data encoding"; fairseq
``examples/data2vec/models/modalities/base.py: ModalitySpecificEncoder``):

- ``local_features(source, padding_mask, grad_mult) -> (feats [B, N, D], token padding [B, N] or None)``,
  the gradient into the local encoder times ``grad_mult`` (data2vec 2.0's ``local_grad_mult``);
- ``forward(feats, mask, ids_keep, clones, check_ids) -> (tokens [R, extra + L, D], positions [R, L]
  or None)``: positions and extra tokens added, only the kept tokens of every clone when ``ids_keep``
  is given;
- ``alibi() -> [H] or None``: the effective ALiBi slopes.

Parts a teacher does not own are set to None on its copy (``teacher.frozen_copy``), by the names
below: ``local_encoder`` (every modality), ``pos_embed`` / ``cls_token`` (images), ``pos_conv`` /
``alibi_scale`` (audio).
"""

from __future__ import annotations

import torch
from torch import nn

from d2v2.kernels.gather_tokens import gather_tokens

from .encoders import (
    AudioFeatureEncoder,
    ConvPositionalEncoder,
    PatchEmbed,
    TokenEmbedding,
    alibi_slopes,
    frame_padding_mask,
    sincos_pos_embed_2d,
)
from .grad import with_grad_mult

__all__ = ["ImageEmbed", "AudioEmbed", "TextEmbed", "EMBED_PARTS", "embed_paths", "migrate_embed_keys"]

EMBED_PARTS = ("local_encoder", "pos_embed", "cls_token", "pos_conv", "alibi_scale")
"""The embedding parts an encoder held directly before they moved under its ``embed`` submodule."""


def embed_paths(parts: tuple[str, ...]) -> tuple[str, ...]:
    """Encoder part names as configs give them (``local_encoder``, ``pos_conv`` ...) as submodule
    paths of an encoder that holds its embedding as ``embed``; other names unchanged."""
    return tuple(f"embed.{part}" if part in EMBED_PARTS else part for part in parts)


def migrate_embed_keys(state: dict, prefixes: tuple[str, ...] = ("",)) -> dict:
    """A state dict written before the embeddings were modules, with the embedding parts directly
    under an encoder (``<prefix>local_encoder.*``, ``<prefix>pos_embed`` ...), in today's names
    (``<prefix>embed.<part>``), for each encoder ``prefix``; a current state dict comes back unchanged."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] in EMBED_PARTS:
                key = f"{prefix}embed.{key[len(prefix) :]}"
                break
        out[key] = value
    return out


class ImageEmbed(nn.Module):
    """Images [B, C, H, W]: patch embedding, fixed 2-D sin-cos positions added before masking (a
    Parameter with requires_grad=False, as MAE's), a CLS token (N(0, 1) init) without position.

    Args:
        image_size: input side in pixels (square), a multiple of ``patch_size``.
        patch_size: patch side.
        in_chans: image channels.
        dim: model width D.
        impl: kernel implementation of ``gather_tokens``.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        side = image_size // patch_size
        self.local_encoder = PatchEmbed(image_size, patch_size, in_chans, dim)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, (side, side)), requires_grad=False)  # [N, D]
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))

    def local_features(self, source, padding_mask=None, grad_mult=1.0):
        return with_grad_mult(self.local_encoder, grad_mult, source), None

    def forward(self, feats, mask=None, ids_keep=None, clones=1, check_ids=True):
        if ids_keep is not None:
            x = gather_tokens(feats, ids_keep, pos=self.pos_embed, clones=clones, impl=self.impl, check_ids=check_ids)
        else:
            x = feats + self.pos_embed.to(feats.dtype)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), None  # [R, 1 + k, D]

    def alibi(self) -> None:
        return None


class AudioEmbed(nn.Module):
    """Waveforms [B, T]: the wav2vec 2.0 CNN, a multi-layer conv positional encoder added to the
    features, and ALiBi with a learned per-head scale on the original frame positions (data2vec 2.0;
    ``alibi=False`` builds none: data2vec 1.0 has only the conv positions).

    Args:
        dim: model width D.
        conv_feature_layers: (channels, kernel, stride) of each CNN layer.
        conv_pos_width, conv_pos_depth, conv_pos_groups: the conv positional encoder.
        num_heads: attention heads H (ALiBi slopes).
        alibi: whether to build ALiBi.
        alibi_scale_init: initial per-head scale.
        impl: kernel implementation.
    """

    def __init__(self, dim: int, conv_feature_layers, conv_pos_width: int, conv_pos_depth: int,
                 conv_pos_groups: int, num_heads: int, alibi: bool = True, alibi_scale_init: float = 1.0,
                 impl: str = "auto"):  # fmt: skip
        super().__init__()
        self.impl = impl
        self.local_encoder = AudioFeatureEncoder(dim, conv_feature_layers)
        self.pos_conv = ConvPositionalEncoder(dim, conv_pos_width, conv_pos_depth, conv_pos_groups, impl)
        # Fixed [H] slopes: not saved, rebuilt on construction.
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads) if alibi else None, persistent=False)
        self.alibi_scale = nn.Parameter(torch.full((num_heads,), float(alibi_scale_init))) if alibi else None

    def local_features(self, source, padding_mask=None, grad_mult=1.0):
        feats = self.local_encoder(source, grad_mult)
        if padding_mask is None:
            return feats, None
        return feats, frame_padding_mask(padding_mask, feats.shape[1], self.local_encoder.conv_spec)

    def forward(self, feats, mask=None, ids_keep=None, clones=1, check_ids=True):
        if ids_keep is None:
            return feats + self.pos_conv(feats), None
        if mask is None:
            raise ValueError("mask is required with ids_keep for audio (masked frames are zeroed before pos_conv)")
        # encoder_zero_mask: the conv positional encoder sees every clone at full length with its
        # masked frames zeroed; its output at the kept frames is added to the kept features.
        batch, length, dim = feats.shape
        hidden = mask.view(batch, clones, length, 1)
        zeroed = torch.where(hidden, 0.0, feats[:, None]).reshape(batch * clones, length, dim)
        pos = self.pos_conv(zeroed)  # [B*K, N, D]
        x = gather_tokens(feats, ids_keep, clones=clones, impl=self.impl, check_ids=check_ids)
        x = x + gather_tokens(pos, ids_keep, impl=self.impl, check_ids=check_ids)
        return x, ids_keep

    def alibi(self) -> torch.Tensor | None:
        if self.alibi_scale is None:
            return None
        return self.alibi_slopes * self.alibi_scale.clamp_min(0)


class TextEmbed(nn.Module):
    """Token ids [B, L]: token + learned absolute positions (padding-aware) + LayerNorm + dropout
    (``TokenEmbedding``); no extra tokens, no ALiBi.

    Args:
        num_embeddings: rows of the token table (the vocabulary, plus a method's own tokens).
        dim, max_positions, padding_idx, norm_eps, dropout: as ``TokenEmbedding``'s.
        impl: kernel implementation of ``gather_tokens``.
    """

    def __init__(self, num_embeddings: int, dim: int, max_positions: int, padding_idx: int | None,
                 norm_eps: float, dropout: float, impl: str = "auto"):  # fmt: skip
        super().__init__()
        self.impl = impl
        self.local_encoder = TokenEmbedding(num_embeddings, dim, max_positions, padding_idx, norm_eps, dropout)

    def local_features(self, source, padding_mask=None, grad_mult=1.0):
        return with_grad_mult(self.local_encoder, grad_mult, source, padding_mask), padding_mask

    def forward(self, feats, mask=None, ids_keep=None, clones=1, check_ids=True):
        if ids_keep is None:
            return feats, None
        return gather_tokens(feats, ids_keep, clones=clones, impl=self.impl, check_ids=check_ids), None

    def alibi(self) -> None:
        return None
