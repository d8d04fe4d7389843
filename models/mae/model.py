"""MAE: a masked autoencoder for images, as a baseline on d2v2's blocks, kernels and trainer.

He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
(arXiv:2111.06377). Reference code: ``facebookresearch/mae: models_mae.py`` (``MaskedAutoencoderViT``)
and ``main_pretrain.py``; the step below follows ``models_mae.py: MaskedAutoencoderViT.forward``.

One training step (``MAE.forward``), B images, one mask each (25 % of the N patches kept):

    feats   = patch_embed(source)                                 [B, N, D]
    x       = gather_tokens(feats, ids_keep, pos=sin-cos)         the kept patches only  [B, k, D]
              CLS (zero position, as MAE's zero CLS row) prepended -> pre-norm blocks -> LayerNorm
    y       = decoder_embed(x)                                    Linear(D -> Dd)        [B, 1 + k, Dd]
    y       = scatter_tokens(y[:, 1:], ids_keep, N, fill=mask_token) + decoder sin-cos positions,
              CLS prepended -> pre-norm blocks -> LayerNorm -> Linear(Dd -> p*p*C), CLS dropped
    target  = patchify(source), normalised per patch (mean, var + 1e-6)          [B, N, p*p*C]
    loss    = mean over masked patches of mean over the p*p*C values of (pred - target)^2

Deliberate differences from the reference, none of which changes what is computed:
    - the masks come with the batch (``random_mask`` in the loader: a uniform random subset of
      floor(N * 0.25) patches per image, as MAE's noise argsort), and the kept ids are ascending
      instead of shuffled: attention is order-free and the positions travel with the tokens;
    - the encoder's sin-cos table has no CLS row and the CLS token gets no position: MAE's CLS row is
      zero, so the sums are the same (the decoder's likewise);
    - the loss is the fused ``masked_regression_loss`` with scale 1 / (p*p*C), which is MAE's mean
      over the values, then over the masked patches.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from d2v2.kernels.masked_regression_loss import masked_regression_loss
from d2v2.kernels.scatter_tokens import scatter_tokens

from ..layers.blocks import PreNormBlock, forward_blocks
from ..layers.encoders import sincos_pos_embed_2d
from ..layers.masking import random_mask
from ..method import Method, batch_masks
from ..modalities import Modality, modality_for
from .config import MAE_PRESETS, MAEConfig, mae_config

__all__ = ["MAE", "MAEConfig", "MAEEncoder", "MAEDecoder", "mae_config", "MAE_PRESETS", "grid_random_mask",
           "patchify", "init_mae_params", "standard_architecture"]  # fmt: skip


def grid_random_mask(rows: int, grid: tuple[int, int], mask_ratio: float, generator=None) -> torch.Tensor:
    """MAE's masking on a patch grid: per row a uniformly random set of floor(H * W * (1 - mask_ratio))
    patches kept (``masking.random_mask`` over the flattened grid). bool [rows, H * W], True = masked."""
    return random_mask(rows, grid[0] * grid[1], mask_ratio, generator)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images [B, C, H, W] -> patches [B, N, p * p * C], row-major patches, values in (p, q, c) order
    (MAE's ``patchify``)."""
    batch, chans, height, width = images.shape
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, chans, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, h * w, patch_size * patch_size * chans)


@torch.no_grad()
def init_mae_params(module: nn.Module) -> None:
    """MAE's ``_init_weights``: Linear weights xavier-uniform with zero bias, LayerNorm 1 / 0. Other
    modules (the patch-embedding conv, xavier on its flattened view) keep their own init.
    Use as ``model.apply(init_mae_params)``."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


class MAEEncoder(nn.Module):
    """The ViT encoder: patch embedding + fixed sin-cos positions (``ImageModality``), CLS, pre-norm
    blocks, final LayerNorm; on the kept patches in training, on all of them for probes and export.

    Roles: ``embed`` (``ImageEmbed``: ``local_encoder``, ``pos_embed`` fixed [N, D], ``cls_token``
    [1, 1, D]), ``blocks``, ``norm``.

    Args:
        cfg: the model config (``MAEConfig``).
        modality: the image modality object that builds and runs the embedding.
    """

    def __init__(self, cfg: MAEConfig, modality: Modality):
        super().__init__()
        self.modality = modality
        self.impl = cfg.impl
        self.embed = modality.build_embed(cfg)  # local_encoder, pos_embed, cls_token
        drop_path = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            PreNormBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, drop_path=rate, impl=cfg.impl)
            for rate in drop_path
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)

    def encode(self, feats: torch.Tensor, ids_keep: torch.Tensor | None = None, check_ids: bool = True) -> torch.Tensor:
        """Patch features [B, N, D] -> [B, 1 + k, D] (CLS first): the kept patches of ``ids_keep``
        [B, k], or all N without it."""
        x, _ = self.embed(feats, ids_keep=ids_keep, check_ids=check_ids)
        x, _ = forward_blocks(self.blocks, x)
        return self.norm(x)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The unmasked encoder: images -> [B, 1 + N, D] (CLS first). For probes and export."""
        feats, _ = self.embed.local_features(source)
        return self.encode(feats)


class MAEDecoder(nn.Module):
    """MAE's decoder: Linear(D -> Dd), one learned mask token at the masked patches, fixed sin-cos
    positions, pre-norm blocks, LayerNorm, Linear(Dd -> p*p*C) per patch.

    Args:
        cfg: the model config (``MAEConfig``).
    """

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        dim = cfg.decoder_dim
        self.impl = cfg.impl
        self.decoder_embed = nn.Linear(cfg.embed_dim, dim)
        # [1, 1, Dd] as MAE's, so that it is weight-decayed as there (only 1-D tensors are not).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, cfg.grid), requires_grad=False)  # [N, Dd]
        self.blocks = nn.ModuleList(
            PreNormBlock(dim, cfg.decoder_heads, cfg.mlp_ratio, cfg.norm_eps, impl=cfg.impl)
            for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.pred = nn.Linear(dim, cfg.patch_values)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, check_ids: bool = True) -> torch.Tensor:
        """Encoder output [B, 1 + k, D] (CLS first) and the kept ids [B, k] -> pixel predictions [B, N, p*p*C]."""
        x = self.decoder_embed(x)  # [B, 1 + k, Dd]
        num_patches = self.pos_embed.shape[0]
        patches = scatter_tokens(x[:, 1:], ids_keep, num_patches, fill=self.mask_token.view(-1), impl=self.impl,
                                 check_ids=check_ids)  # fmt: skip  # [B, N, Dd]
        x = torch.cat([x[:, :1], patches + self.pos_embed.to(patches.dtype)], dim=1)  # [B, 1 + N, Dd]
        x, _ = forward_blocks(self.blocks, x)
        return self.pred(self.norm(x))[:, 1:]  # CLS dropped


class MAE(Method):
    """MAE for images: encoder on the kept patches, transformer decoder, normalised-pixel loss.

    A ``Method`` (see ``method``): no teacher, one mask per image (the modality's clones = 1).

    Batch (made by the data loader): ``source`` images [B, C, H, W]; ``mask`` bool [B, N], True =
    masked, the same count in every row (``modality.make_masks``); ``ids_keep`` int [B, k] (the kept
    patches ascending; derived from ``mask`` when absent, one host sync).

    Args:
        cfg: the model config (``mae_config("image", size)`` for a preset).
    """

    embedded_encoders = ("encoder.",)

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.modality = modality_for(cfg, clones=1, masker=partial(grid_random_mask, mask_ratio=cfg.mask_ratio))
        self.encoder = MAEEncoder(cfg, self.modality)
        self.decoder = MAEDecoder(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's ``initialize_weights``: xavier-uniform Linear layers with zero biases, LayerNorm 1 / 0,
        the patch embedding xavier-uniform as a Linear (``PatchEmbed``'s own init), CLS and mask token
        N(0, 0.02); the sin-cos tables are fixed."""
        self.apply(init_mae_params)
        with torch.no_grad():
            nn.init.normal_(self.encoder.embed.cls_token, std=0.02)
            nn.init.normal_(self.decoder.mask_token, std=0.02)

    def forward(self, batch: dict) -> dict:
        """One MAE step (see the module docstring). Returns ``loss`` (fp32 scalar) and ``sample_size``
        (masked patches); no host sync."""
        cfg = self.cfg
        source = batch["source"]
        feats, _ = self.encoder.embed.local_features(source)  # [B, N, D]
        batch_size, num_patches, _ = feats.shape
        # batch_masks validated ids_keep: the kernels skip their range checks (host syncs).
        mask, ids_keep = batch_masks(batch, batch_size, 1, num_patches, feats.device)
        x = self.encoder.encode(feats, ids_keep, check_ids=False)  # [B, 1 + k, D]
        pred = self.decoder(x, ids_keep, check_ids=False)  # [B, N, p*p*C]
        with torch.no_grad():
            target = self.pixel_targets(source)
        loss = masked_regression_loss(pred, target, mask, clones=1, scale=1.0 / cfg.patch_values, impl=cfg.impl)
        return {"loss": loss, "sample_size": batch_size * (num_patches - ids_keep.shape[1])}

    @torch.no_grad()
    def pixel_targets(self, source: torch.Tensor) -> torch.Tensor:
        """The regression targets [B, N, p*p*C] fp32: patches, normalised per patch with norm_pix_loss."""
        target = patchify(source.float(), self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target


def standard_architecture(cfg: MAEConfig) -> tuple[str | None, str]:
    """The standard class this encoder is, for export: timm's ViT, or (None, why not)."""
    if cfg.norm_eps != 1e-6:
        return None, f"norm_eps {cfg.norm_eps}: timm's ViT uses 1e-6"
    return "timm-vit", "a pre-norm ViT"
