"""The weight names of fairseq's data2vec 2.0 and d2v2's, both ways, in one table.

fairseq (``examples/data2vec/models/data2vec2.py: Data2VecMultiModel``, ``modalities/*.py``) keeps the
modality's parts under ``modality_encoders.<IMAGE|AUDIO|TEXT>.`` and the shared blocks under
``blocks.N.``; its EMA teacher is the ``_ema`` entry of the state dict (the whole model less the
decoder, and less the local encoder unless ``ema_local_encoder``, or with ``ema_encoder_only`` only
the shared blocks, named ``N.``). d2v2's names are those of ``Data2Vec2`` (``encoder.``, ``decoder.``,
``teacher.``). Per part, with ``M`` = ``modality_encoders.<MODALITY>.``:

    d2v2 (encoder / teacher)                      fairseq
    local_encoder.proj.*                          M.local_encoder.proj.*                 image PatchEmbed
    pos_embed [N, D]                              M.fixed_positional_encoder.positions [1, N, D]
    cls_token [1, 1, D]                           M.extra_tokens
    local_encoder.conv_layers.i.conv.weight       M.local_encoder.conv_layers.i.0.weight  audio CNN
    local_encoder.conv_layers.i.layer_norm.*      M.local_encoder.conv_layers.i.2.1.*
    local_encoder.project_norm.* / project.*      M.project_features.1.* / .2.*
    pos_conv.convs.i.*                            M.relative_positional_encoder.(i+1).0.*
    alibi_scale [H]                               M.alibi_scale [1, 1, H, 1, 1] (or [1, H, 1, 1])
    local_encoder.embed_tokens.weight             M.local_encoder.embed_tokens.weight    text
    local_encoder.embed_positions.weight [P, D]   M.local_encoder.embed_positions.weight [pad + 1 + P, D]
    local_encoder.layer_norm.*                    M.local_encoder.layernorm_embedding.*
    context_norm.*                                M.context_encoder.norm.*
    prenet.i.*                                    M.context_encoder.blocks.i.*
    blocks.i.*                                    blocks.i.*  (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
    decoder.blocks.i.*                            M.decoder.blocks.i.0.*
    decoder.proj.*                                M.decoder.proj.*

Text positions: fairseq's learned positions are padding-aware with an offset, position p of a
sequence reading row padding_idx + 1 + p (rows 0 .. padding_idx are never read by a real token);
d2v2 reads row p, so the first padding_idx + 1 rows are dropped on import.

fairseq's wav2vec 2.0 and data2vec 1.0 audio encoders (``Wav2Vec2Model``, ``Data2VecAudioModel``:
``ConvFeatureExtractionModel`` and ``TransformerEncoder``) are the architectures d2v2 exports to Hugging
Face's ``Wav2Vec2Model`` / ``Data2VecAudioModel``, whose names are fairseq's module for module. So
``wav2vec_fairseq_names`` goes d2v2 -> HF with the export's tables (``standard_targets``), then HF ->
fairseq with ``WAV2VEC_RULES``::

    HF (d2v2's export)                            fairseq
    feature_extractor.conv_layers.i.conv.*        feature_extractor.conv_layers.i.0.*
    feature_extractor.conv_layers.i.layer_norm.*  .i.2.1.* (LayerNorm CNN) / .0.2.* (GroupNorm, layer 0)
    feature_projection.layer_norm / projection    layer_norm / post_extract_proj
    masked_spec_embed                             mask_emb
    encoder.pos_conv_embed.conv.*                 encoder.pos_conv.0.{bias, weight_g, weight_v}
    encoder.pos_conv_embed.layers.i.conv.*        encoder.pos_conv.i.0.*   (data2vec 1.0: a conv stack)
    encoder.layers.i.attention.{q,k,v,out}_proj   encoder.layers.i.self_attn.{q,k,v,out}_proj
    encoder.layers.i.layer_norm                   encoder.layers.i.self_attn_layer_norm
    encoder.layers.i.feed_forward.*_dense         encoder.layers.i.fc1 / fc2
    encoder.layers.i.final_layer_norm, encoder.layer_norm   the same
"""

from __future__ import annotations

import re

import torch

from .standard_targets import DATA2VEC_AUDIO_KEYS, WAV2VEC2_KEYS, rename

__all__ = ["fairseq_name", "fairseq_tensor", "d2v2_tensor", "wav2vec_fairseq_names", "TAGS"]

TAGS = {"image": "IMAGE", "audio": "AUDIO", "text": "TEXT"}
"""fairseq's ``Modality`` names, the keys of ``modality_encoders``."""

# (d2v2 pattern relative to the encoder, fairseq pattern relative to the modality encoder); None as
# the fairseq side of a rule means "a shared block" (relative to the model, not the modality encoder).
_ENCODER_RULES = [
    (r"local_encoder\.proj\.(weight|bias)", r"local_encoder.proj.\1"),
    (r"pos_embed", r"fixed_positional_encoder.positions"),
    (r"cls_token", r"extra_tokens"),
    (r"local_encoder\.conv_layers\.(\d+)\.conv\.weight", r"local_encoder.conv_layers.\1.0.weight"),
    (r"local_encoder\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", r"local_encoder.conv_layers.\1.2.1.\2"),
    (r"local_encoder\.project_norm\.(weight|bias)", r"project_features.1.\1"),
    (r"local_encoder\.project\.(weight|bias)", r"project_features.2.\1"),
    (r"alibi_scale", r"alibi_scale"),
    (r"local_encoder\.embed_tokens\.weight", r"local_encoder.embed_tokens.weight"),
    (r"local_encoder\.embed_positions\.weight", r"local_encoder.embed_positions.weight"),
    (r"local_encoder\.layer_norm\.(weight|bias)", r"local_encoder.layernorm_embedding.\1"),
    (r"context_norm\.(weight|bias)", r"context_encoder.norm.\1"),
    (r"prenet\.(\d+)\.(.+)", r"context_encoder.blocks.\1.\2"),
]
_DECODER_RULES = [
    (r"blocks\.(\d+)\.(weight|bias)", r"decoder.blocks.\1.0.\2"),
    (r"proj\.(.+)", r"decoder.proj.\1"),
]


def fairseq_name(name: str, modality: str, teacher_blocks_only: bool = False) -> str:
    """The fairseq name of the d2v2 ``Data2Vec2`` parameter ``name`` (``encoder.*``, ``decoder.*`` or
    ``teacher.*``). Teacher names are relative to the ``_ema`` dict; ``teacher_blocks_only``: the EMA
    holds only the shared blocks (``ema_encoder_only``), named ``N.*``."""
    part, _, rest = name.partition(".")
    prefix = f"modality_encoders.{TAGS[modality]}."
    if part == "decoder":
        return prefix + _apply(_DECODER_RULES, rest, name)
    if part not in ("encoder", "teacher"):
        raise ValueError(f"no fairseq name for {name}")
    rest = rest.removeprefix("embed.")  # the rules name the embedding's parts as the encoder's own
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if block:
        return f"{block[1]}.{block[2]}" if part == "teacher" and teacher_blocks_only else rest
    pos_conv = re.fullmatch(r"pos_conv\.convs\.(\d+)\.(weight|bias)", rest)
    if pos_conv:  # index 0 of fairseq's Sequential is a TransposeLast
        return f"{prefix}relative_positional_encoder.{int(pos_conv[1]) + 1}.0.{pos_conv[2]}"
    return prefix + _apply(_ENCODER_RULES, rest, name)


def _apply(rules, rest: str, name: str) -> str:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, rest):
            return re.sub(f"^{pattern}$", replacement, rest)
    raise ValueError(f"no fairseq name for {name}")


def fairseq_tensor(name: str, tensor: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """d2v2's tensor of ``name`` in fairseq's layout (the inverse of ``d2v2_tensor``)."""
    if name.endswith("pos_embed"):
        return tensor[None]  # [N, D] -> [1, N, D]
    if name.endswith("alibi_scale"):
        return tensor.view(1, 1, -1, 1, 1)  # [H] -> [1, 1, H, 1, 1]
    if name.endswith("embed_positions.weight"):
        offset = (padding_idx if padding_idx is not None else -1) + 1
        unused = torch.zeros(offset, tensor.shape[1], dtype=tensor.dtype)  # rows a real token never reads
        return torch.cat([unused, tensor])
    return tensor


def d2v2_tensor(name: str, tensor: torch.Tensor, like: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """fairseq's ``tensor`` for the d2v2 parameter ``name`` in d2v2's layout (``like`` is d2v2's own
    tensor of that name: its shape is the target). ValueError when the shapes cannot match."""
    if name.endswith("pos_embed") and tensor.dim() == 3:
        tensor = tensor[0]
    elif name.endswith("alibi_scale"):
        if tensor.dim() == 5 and tensor.shape[0] != 1:
            raise ValueError("the checkpoint has a per-layer ALiBi scale (learned_alibi_scale_per_layer), "
                             "which d2v2 does not implement; it shares one scale per head across layers")  # fmt: skip
        tensor = tensor.reshape(-1)
        if tensor.numel() == 1:  # one scale for all heads (learned_alibi_scale_per_head false)
            tensor = tensor.expand(like.shape).clone()
    elif name.endswith("embed_positions.weight"):
        offset = (padding_idx if padding_idx is not None else -1) + 1
        tensor = tensor[offset : offset + like.shape[0]]
    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(f"the checkpoint's weight for {name} has shape {list(tensor.shape)}, the model built from "
                         f"its config needs {list(like.shape)}; the config and weights disagree")  # fmt: skip
    return tensor.to(like.dtype)


WAV2VEC_RULES = (
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_projection\.layer_norm\.", "layer_norm."),
    (r"feature_projection\.projection\.", "post_extract_proj."),
    (r"masked_spec_embed$", "mask_emb"),
    # torch's weight norm, old (fairseq's) and new (ours): the norm g and the direction v
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0$", "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1$", "encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.", "encoder.pos_conv.0."),
    (r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.", r"encoder.pos_conv.\1.0."),
    (r"encoder\.layer_norm\.", "encoder.layer_norm."),
    (r"encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
)
"""Hugging Face's names of a wav2vec 2.0 / data2vec 1.0 encoder -> fairseq's (the CNN's norms: ``CNN_NORMS``)."""
CNN_NORMS = {"default": r"feature_extractor.conv_layers.\1.2.", "layer_norm": r"feature_extractor.conv_layers.\1.2.1."}
"""fairseq's CNN norm by ``extractor_mode``: a GroupNorm module, or a LayerNorm between two transposes."""
HF_TABLES = {"wav2vec2": WAV2VEC2_KEYS, "data2vec": DATA2VEC_AUDIO_KEYS}


def wav2vec_fairseq_names(names, method: str, extractor_mode: str) -> dict[str, str]:
    """fairseq's name of each d2v2 encoder parameter of ``names`` (``attn.q`` / ``attn.k`` / ``attn.v``: the
    thirds of ``attn.qkv``, as ``split_qkv`` makes them; ``mask_emb`` the mask vector) of ``method``
    (wav2vec2 or data2vec) whose CNN is in ``extractor_mode``."""
    rules = WAV2VEC_RULES + ((r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", CNN_NORMS[extractor_mode]),)
    hf = rename({name: name for name in names}, HF_TABLES[method])  # the values ride along: HF name -> ours
    return {ours: theirs for theirs, ours in rename(hf, rules).items()}
