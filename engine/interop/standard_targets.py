"""The standard classes d2v2's encoders export to: each one's key table, state mapping and config.json.

A method says which standard class its encoder is for a given config (``MethodEntry.export`` in
``d2v2.models.methods``: a name of ``TARGETS``, or None and why); ``export`` looks that name up here
and never branches on the method. The key tables name d2v2's encoder parameters (the embedding's
parts as ``local_encoder`` / ``pos_embed`` ..., relative to the encoder's ``embed``) and their
counterparts; fairseq's names are in ``fairseq_keys``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------
# Key tables: (d2v2 name pattern, target name), matched from the start of the key, first match wins.
# ``attn.q`` / ``attn.k`` / ``attn.v`` are the three thirds of ``attn.qkv`` (split_qkv).
# ---------------------------------------------------------------------------------------------------

BERT_BLOCK = (
    (r"blocks\.(\d+)\.attn\.q\.", r"encoder.layer.\1.attention.self.query."),
    (r"blocks\.(\d+)\.attn\.k\.", r"encoder.layer.\1.attention.self.key."),
    (r"blocks\.(\d+)\.attn\.v\.", r"encoder.layer.\1.attention.self.value."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.attention.output.LayerNorm."),  # post-norm: after attention
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.output.LayerNorm."),  # post-norm: after the FFN
)
ROBERTA_KEYS = (
    (r"local_encoder\.embed_tokens\.", "embeddings.word_embeddings."),
    (r"local_encoder\.embed_positions\.", "embeddings.position_embeddings."),
    (r"local_encoder\.layer_norm\.", "embeddings.LayerNorm."),
) + BERT_BLOCK

WAV2VEC2_BLOCK = (
    (r"blocks\.(\d+)\.attn\.q\.", r"encoder.layers.\1.attention.q_proj."),
    (r"blocks\.(\d+)\.attn\.k\.", r"encoder.layers.\1.attention.k_proj."),
    (r"blocks\.(\d+)\.attn\.v\.", r"encoder.layers.\1.attention.v_proj."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.attention.out_proj."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.\1.feed_forward.intermediate_dense."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.\1.feed_forward.output_dense."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.final_layer_norm."),
)
AUDIO_CNN = (
    (r"local_encoder\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.conv."),
    (r"local_encoder\.conv_layers\.(\d+)\.layer_norm\.", r"feature_extractor.conv_layers.\1.layer_norm."),
    (r"local_encoder\.conv_layers\.(\d+)\.group_norm\.", r"feature_extractor.conv_layers.\1.layer_norm."),
    (r"local_encoder\.project_norm\.", "feature_projection.layer_norm."),
    (r"local_encoder\.project\.", "feature_projection.projection."),
)
WAV2VEC2_KEYS = AUDIO_CNN + (
    (r"mask_emb$", "masked_spec_embed"),
    (r"pos_conv\.conv\.", "encoder.pos_conv_embed.conv."),  # weight norm: parametrizations.weight.original0/1
    (r"norm\.", "encoder.layer_norm."),
) + WAV2VEC2_BLOCK
DATA2VEC_AUDIO_KEYS = AUDIO_CNN + (
    (r"mask_emb$", "masked_spec_embed"),
    (r"pos_conv\.convs\.(\d+)\.", r"encoder.pos_conv_embed.layers.\1.conv."),
    (r"input_norm\.", "encoder.layer_norm."),
) + WAV2VEC2_BLOCK

TIMM_VIT_KEYS = (
    (r"local_encoder\.proj\.", "patch_embed.proj."),
    (r"pos_embed$", "pos_embed"),
    (r"cls_token$", "cls_token"),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.attn.qkv."),  # the same layout: fused, q then k then v
    (r"blocks\.(\d+)\.(norm1|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"norm\.", "norm."),
)
BEIT_KEYS = (
    (r"local_encoder\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"pos_embed$", "embeddings.position_embeddings"),
    (r"cls_token$", "embeddings.cls_token"),
    (r"mask_emb$", "embeddings.mask_token"),
    (r"blocks\.(\d+)\.gamma_1$", r"encoder.layer.\1.lambda_1"),
    (r"blocks\.(\d+)\.gamma_2$", r"encoder.layer.\1.lambda_2"),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),  # pre-norm: before attention
    (r"blocks\.(\d+)\.attn\.q\.", r"encoder.layer.\1.attention.attention.query."),
    (r"blocks\.(\d+)\.attn\.k\.bias$", None),  # BEiT's key has no bias; the softmax cancels ours
    (r"blocks\.(\d+)\.attn\.k\.", r"encoder.layer.\1.attention.attention.key."),
    (r"blocks\.(\d+)\.attn\.v\.", r"encoder.layer.\1.attention.attention.value."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"norm\.", "layernorm."),
)


def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every ``attn.qkv.{weight,bias}`` [3D, ...] as ``attn.q``, ``attn.k``, ``attn.v`` [D, ...] (rows in
    q, k, v order, as ``blocks.Attention`` splits them)."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*\.attn\.)qkv\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        for part, chunk in zip("qkv", value.chunk(3, dim=0)):
            out[f"{match[1]}{part}.{match[2]}"] = chunk
    return out


def join_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``split_qkv``: every ``attn.q`` / ``attn.k`` / ``attn.v`` triple as one ``attn.qkv``."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*\.attn\.)([qkv])\.(weight|bias)", key)
        if match is None:
            out[key] = value
        elif match[2] == "q":
            parts = [state[f"{match[1]}{part}.{match[3]}"] for part in "qkv"]
            out[f"{match[1]}qkv.{match[3]}"] = torch.cat(parts, dim=0)
    return out


def rename(state: dict[str, torch.Tensor], table) -> dict[str, torch.Tensor]:
    """Keys renamed by ``table`` (pattern, replacement or None to drop); a key no rule names is a bug
    of the table, reported with the key (so no weight is ever left out silently)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("embed.")  # the tables name the embedding's parts as the encoder's own
        for pattern, target in table:
            match = re.match(pattern, key)
            if match:
                if target is not None:
                    out[match.expand(target) + key[match.end() :]] = value
                break
        else:
            raise KeyError(f"export table has no rule for encoder weight {key!r}")
    return out


def with_cls_row(pos: torch.Tensor) -> torch.Tensor:
    """Fixed positions [N, D] -> [1, 1 + N, D] with a zero CLS row (d2v2's CLS gets no position)."""
    return torch.cat([pos.new_zeros(1, pos.shape[1]), pos])[None]


# ---------------------------------------------------------------------------------------------------
# Targets: the state and config.json of each standard class.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A standard class an encoder exports to."""

    name: str
    """The class (``Data2VecTextModel``) or timm architecture."""
    library: str
    """"transformers" or "timm"."""
    state: Callable[[dict, object], dict]
    """(d2v2 encoder state, method config) -> the class's state dict."""
    config: Callable[[object], dict]
    """method config -> the class's config.json."""


def _hf_common(cfg, architecture: str, model_type: str) -> dict:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio),
        "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU()
        "layer_norm_eps": cfg.norm_eps,
        "torch_dtype": "float32",
    }


def roberta_state(state: dict, cfg) -> dict:
    out = rename(split_qkv(state), ROBERTA_KEYS)
    pos = out["embeddings.position_embeddings.weight"]
    # RoBERTa numbers positions from padding_idx + 1; pad tokens take row padding_idx (zero here,
    # as d2v2 gives padding no position).
    out["embeddings.position_embeddings.weight"] = torch.cat([pos.new_zeros(cfg.padding_idx + 1, pos.shape[1]), pos])
    out["embeddings.token_type_embeddings.weight"] = pos.new_zeros(1, pos.shape[1])  # one type, adds nothing
    return out


def roberta_config(architecture: str, model_type: str) -> Callable[[object], dict]:
    def config(cfg) -> dict:
        return {
            **_hf_common(cfg, architecture, model_type),
            "vocab_size": getattr(cfg, "num_embeddings", cfg.vocab_size),
            "max_position_embeddings": cfg.max_positions + cfg.padding_idx + 1,
            "pad_token_id": cfg.padding_idx,
            "type_vocab_size": 1,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": cfg.encoder_dropout,
            "attention_probs_dropout_prob": cfg.attention_dropout,
        }

    return config


def _audio_cnn_config(cfg) -> dict:
    layers = cfg.conv_feature_layers
    return {
        "conv_dim": [c for c, _, _ in layers],
        "conv_kernel": [k for _, k, _ in layers],
        "conv_stride": [s for _, _, s in layers],
        "conv_bias": False,
        "feat_extract_activation": "gelu",
        "hidden_dropout": cfg.encoder_dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "layerdrop": cfg.layerdrop,
    }


def wav2vec2_config(cfg) -> dict:
    return {
        **_hf_common(cfg, "Wav2Vec2Model", "wav2vec2"),
        **_audio_cnn_config(cfg),
        "feat_extract_norm": "group" if cfg.extractor_mode == "default" else "layer",
        "feat_proj_layer_norm": True,
        "do_stable_layer_norm": False,  # post-norm blocks, LayerNorm after the positions
        "num_conv_pos_embeddings": cfg.conv_pos_kernel,
        "num_conv_pos_embedding_groups": cfg.conv_pos_groups,
    }


def data2vec_audio_config(cfg) -> dict:
    return {
        **_hf_common(cfg, "Data2VecAudioModel", "data2vec-audio"),
        **_audio_cnn_config(cfg),
        "conv_pos_kernel_size": max(3, cfg.conv_pos_width // cfg.conv_pos_depth),
        "num_conv_pos_embeddings": cfg.conv_pos_depth,
        "num_conv_pos_embedding_groups": cfg.conv_pos_groups,
    }


def beit_state(state: dict, cfg) -> dict:
    out = rename(split_qkv(state), BEIT_KEYS)
    out["embeddings.position_embeddings"] = with_cls_row(out["embeddings.position_embeddings"])
    if "embeddings.mask_token" in out:  # a fine-tuned encoder has none (data2vec 1.0 keeps it on the method)
        out["embeddings.mask_token"] = out["embeddings.mask_token"].view(1, 1, -1)
    return out


def data2vec_vision_config(cfg) -> dict:
    return {
        **_hf_common(cfg, "Data2VecVisionModel", "data2vec-vision"),
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "use_absolute_position_embeddings": True,  # the fixed sin-cos table, as learned-style weights
        "use_relative_position_bias": False,
        "use_shared_relative_position_bias": False,
        "use_mask_token": True,  # data2vec 1.0's learned mask vector
        "use_mean_pooling": False,  # the final LayerNorm on every token, as ours
        "layer_scale_init_value": cfg.layer_scale_init,
        "hidden_dropout_prob": cfg.encoder_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "drop_path_rate": cfg.drop_path_rate,
    }


def timm_vit_state(state: dict, cfg) -> dict:
    out = rename(state, TIMM_VIT_KEYS)
    out["pos_embed"] = with_cls_row(out["pos_embed"])
    return out


# timm's registered ViTs at d2v2's sizes; other shapes take vit_base_patch16_224 with model_args overriding it.
TIMM_VITS = {"vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"}
TIMM_WIDTHS = {384: "small", 768: "base", 1024: "large", 1280: "huge"}


def timm_vit_config(cfg) -> dict:
    """timm's hub config (``timm.create_model("local-dir:<folder>", pretrained=True)`` reads it)."""
    architecture = f"vit_{TIMM_WIDTHS.get(cfg.embed_dim)}_patch{cfg.patch_size}_{cfg.image_size}"
    if architecture not in TIMM_VITS:
        architecture = "vit_base_patch16_224"
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": "token",
        "model_args": {
            "img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
            "num_classes": 0, "global_pool": "token",
        },  # fmt: skip
        "pretrained_cfg": {
            "tag": "d2v2", "input_size": [cfg.in_chans, cfg.image_size, cfg.image_size], "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": 1.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
        },  # fmt: skip
    }


def _hf_state(table) -> Callable[[dict, object], dict]:
    return lambda state, cfg: rename(split_qkv(state), table)


DATA2VEC_TEXT = Target("Data2VecTextModel", "transformers", roberta_state, roberta_config("Data2VecTextModel", "data2vec-text"))
ROBERTA = Target("RobertaModel", "transformers", roberta_state, roberta_config("RobertaModel", "roberta"))
WAV2VEC2 = Target("Wav2Vec2Model", "transformers", _hf_state(WAV2VEC2_KEYS), wav2vec2_config)
DATA2VEC_AUDIO = Target("Data2VecAudioModel", "transformers", _hf_state(DATA2VEC_AUDIO_KEYS), data2vec_audio_config)
DATA2VEC_VISION = Target("Data2VecVisionModel", "transformers", beit_state, data2vec_vision_config)
TIMM_VIT = Target("timm VisionTransformer", "timm", timm_vit_state, timm_vit_config)


def _needs_padding_idx(cfg) -> str | None:
    """RoBERTa numbers positions after the padding id: a text encoder without one does not fit."""
    if getattr(cfg, "padding_idx", None) is None:
        return "no padding_idx, which RoBERTa's position numbering needs"
    return None


TARGETS: dict[str, Target] = {
    "data2vec-text": DATA2VEC_TEXT,
    "roberta": ROBERTA,
    "wav2vec2": WAV2VEC2,
    "data2vec-audio": DATA2VEC_AUDIO,
    "data2vec-vision": DATA2VEC_VISION,
    "timm-vit": TIMM_VIT,
}
"""The standard classes by the names methods give them (``MethodEntry.export``)."""
REFUSALS: dict[str, Callable[[object], str | None]] = {"data2vec-text": _needs_padding_idx, "roberta": _needs_padding_idx}
"""Why a config cannot take a target at all, whatever the method (None: it can)."""


# ---------------------------------------------------------------------------------------------------
# Fine-tuned models: the encoder's class with its classification head (``d2v2.models.tasks`` heads).
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadTarget:
    """The class an encoder's standard class becomes with a head: the encoder's keys go under ``prefix``."""

    name: str
    prefix: str
    state: Callable[[dict, object], dict]
    """(head state in d2v2 names, method config) -> the class's head weights."""
    config: Callable[[object], dict]
    """method config -> what the class's config.json adds (beyond the labels)."""


def sentence_head_state(head: dict, cfg) -> dict:
    """RoBERTa's ``RobertaClassificationHead``: the same layers under ``classifier.``."""
    return {f"classifier.{k}": v for k, v in head.items()}


def pooled_audio_head_state(head: dict, cfg) -> dict:
    """``*ForSequenceClassification`` projects the frames, mean-pools, then classifies; the mean commutes
    with a linear map, so an identity projector and our linear layer as its classifier are our head."""
    eye = torch.eye(cfg.embed_dim, dtype=head["linear.weight"].dtype)
    return {"projector.weight": eye, "projector.bias": eye.new_zeros(cfg.embed_dim),
            "classifier.weight": head["linear.weight"], "classifier.bias": head["linear.bias"]}  # fmt: skip


def pooled_image_head_state(head: dict, cfg) -> dict:
    """BEiT's mean pooling: the LayerNorm of the mean patch (``pooler.layernorm``), then ``classifier``."""
    return {"pooler.layernorm.weight": head["norm.weight"], "pooler.layernorm.bias": head["norm.bias"],
            "classifier.weight": head["linear.weight"], "classifier.bias": head["linear.bias"]}  # fmt: skip


HEAD_TARGETS: dict[str, HeadTarget] = {
    "Data2VecTextModel": HeadTarget("Data2VecTextForSequenceClassification", "data2vec_text.", sentence_head_state,
                                    lambda cfg: {}),
    "RobertaModel": HeadTarget("RobertaForSequenceClassification", "roberta.", sentence_head_state, lambda cfg: {}),
    "Wav2Vec2Model": HeadTarget("Wav2Vec2ForSequenceClassification", "wav2vec2.", pooled_audio_head_state,
                                lambda cfg: {"classifier_proj_size": cfg.embed_dim, "use_weighted_layer_sum": False}),
    # data2vec 1.0 keeps its mask vector on the method, not the fine-tuned encoder: no masking, no vector.
    "Data2VecAudioModel": HeadTarget("Data2VecAudioForSequenceClassification", "data2vec_audio.", pooled_audio_head_state,
                                     lambda cfg: {"classifier_proj_size": cfg.embed_dim, "use_weighted_layer_sum": False,
                                                  "mask_time_prob": 0.0, "mask_feature_prob": 0.0}),
    "Data2VecVisionModel": HeadTarget("Data2VecVisionForImageClassification", "data2vec_vision.", pooled_image_head_state,
                                      lambda cfg: {"use_mean_pooling": True, "use_mask_token": False}),
}  # fmt: skip
"""By the encoder's standard class (``Target.name``): its class with a head, where one matches ours."""


def ctc_head_state(head: dict, cfg) -> dict:
    """``*ForCTC``'s ``lm_head`` is our ``CTCHead``'s linear layer (its dropout is ``final_dropout``)."""
    return {"lm_head.weight": head["linear.weight"], "lm_head.bias": head["linear.bias"]}


CTC_TARGETS: dict[str, HeadTarget] = {
    "Wav2Vec2Model": HeadTarget("Wav2Vec2ForCTC", "wav2vec2.", ctc_head_state, lambda cfg: {}),
    "Data2VecAudioModel": HeadTarget("Data2VecAudioForCTC", "data2vec_audio.", ctc_head_state, lambda cfg: {}),
}
"""By the encoder's standard class: its class with a CTC head (speech recognition, ``SpeechRecognizer``)."""
