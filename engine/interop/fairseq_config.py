"""fairseq's data2vec 2.0 model config (``Data2VecMultiConfig``, as plain data) -> d2v2's ``Data2Vec2Config``.

The fields map one to one where both implement the same thing (``depth``, ``embed_dim``,
``average_top_k_layers``, ``clone_batch``, the modality's ``prenet_depth``, masking and ``decoder``
settings, ...). A setting d2v2 does not implement is refused when it changes the encoder's output
(pre-norm blocks, end-of-block targets, no-affine norms, a per-layer or learned ALiBi table, decoder
positions, a shared decoder, another feature extractor mode) and reported as ignored when it only
changed fairseq's training (``dropout_input``, ``recon_loss``, ...).

``wav2vec_from_fairseq`` maps the encoder fields of fairseq's wav2vec 2.0 (``Wav2Vec2Config``) and
data2vec 1.0 audio (``Data2VecAudioConfig``) configs (``encoder_layers``, ``encoder_embed_dim``,
``conv_feature_layers``, ``conv_pos``, ``pos_conv_depth``, the dropouts) onto ``Wav2Vec2Config`` /
``Data2Vec1Config``: what the recogniser of a CTC fine-tune needs, refusing pre-norm blocks, conformer
layers and CNN biases.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import torch

from d2v2.models import ENCODER_SIZES, method_config
from d2v2.models.data2vec1 import DATA2VEC1_PRESETS, Data2Vec1Config
from d2v2.models.data2vec2 import DATA2VEC2_PRESETS, Data2Vec2Config, data2vec2_config
from d2v2.models.wav2vec2 import WAV2VEC2_PRESETS, Wav2Vec2Config

from .fairseq_keys import TAGS

__all__ = ["ImportedConfig", "WAV2VEC_MODELS", "pretraining_config", "data2vec2_from_fairseq", "wav2vec_from_fairseq",
           "parse_conv_spec"]  # fmt: skip

WAV2VEC_MODELS = {"wav2vec2": ("wav2vec2", "wav2vec 2.0"), "data2vec_audio": ("data2vec", "data2vec 1.0 audio")}
"""fairseq's wav2vec 2.0 family (``Wav2Vec2Model``, ``Data2VecAudioModel``): (d2v2 method, in words) by model name."""
DEFAULT_CONV_SPEC = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
"""fairseq's default CNN (``conv_feature_layers``, ``feature_encoder_spec``)."""


@dataclass
class ImportedConfig:
    """The d2v2 config of an imported model and what the mapping had to say about it."""

    config: Data2Vec2Config | Wav2Vec2Config | Data2Vec1Config
    size: str
    """The size preset the config starts from (its dimensions are overridden where they differ)."""
    notes: list[str] = field(default_factory=list)
    """Settings that only changed fairseq's training and are not carried over."""
    method: str = "data2vec2"
    """The d2v2 method the config is for."""
    description: str = "data2vec 2.0"
    """The fairseq model, in words."""


def pretraining_config(model_cfg: dict) -> tuple[dict, str | None]:
    """The data2vec 2.0 model config inside a checkpoint's model config, and the fine-tuning model's
    kind when it is a fine-tune (its ``w2v_args`` / ``pretrained_model_args`` hold the pretraining
    run's whole config, whose ``model`` entry is the one we need)."""
    for key in ("w2v_args", "pretrained_model_args"):
        inner = model_cfg.get(key)
        if isinstance(inner, dict):
            inner_model = inner.get("model", inner)
            if isinstance(inner_model, dict):
                return inner_model, str(model_cfg.get("_name") or model_cfg.get("arch") or key)
    for key in ("w2v_path", "model_path"):
        if key in model_cfg:
            raise ValueError(f"the checkpoint is a fine-tune ({model_cfg.get('_name')}) without the pretraining "
                             f"run's config (w2v_args / pretrained_model_args); import its {key} instead")  # fmt: skip
    return model_cfg, None


def parse_conv_spec(spec) -> tuple[tuple[int, int, int], ...]:
    """fairseq's ``feature_encoder_spec``, a Python expression such as ``[(512, 10, 5)] + [(512, 3, 2)] * 4``,
    read without ``eval``: only list / tuple literals of integers, ``+`` and ``*``."""
    if not isinstance(spec, str):
        return tuple(tuple(int(v) for v in layer) for layer in spec)

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"feature_encoder_spec {spec!r} is not a list of (channels, kernel, stride) tuples")

    try:
        layers = value(ast.parse(spec, mode="eval").body)
        return tuple((int(c), int(k), int(s)) for c, k, s in layers)
    except (SyntaxError, TypeError, ValueError) as e:
        raise ValueError(f"feature_encoder_spec {spec!r} is not a list of (channels, kernel, stride) tuples") from e


def _modality_of(model_cfg: dict, state: dict) -> str:
    supported = model_cfg.get("supported_modality")
    if isinstance(supported, str) and supported.split(".")[-1].lower() in TAGS:
        return supported.split(".")[-1].lower()
    present = sorted({key.split(".")[1] for key in state if key.startswith("modality_encoders.")})
    modalities = [m for m, tag in TAGS.items() if tag in present]
    if len(modalities) != 1:
        raise ValueError(f"the checkpoint holds modality encoders {present or 'none'}; d2v2 imports a model "
                         "of exactly one modality (IMAGE, AUDIO or TEXT)")  # fmt: skip
    return modalities[0]


def _section(value, where: str) -> dict:
    """A config section (a mapping), or a ValueError naming it; an absent one is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"the checkpoint's {where} is {_short(value)}, not a section of settings (a mapping); "
                         f"make {where} a mapping in its config to import it")  # fmt: skip
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _typed(value, name: str, kind: type):
    """``value`` as an int, float or bool, refused (naming ``name``) where it is not one: an unresolved
    ``${...}`` interpolation, a word, or a fraction where a count belongs (never truncated)."""
    if isinstance(value, str) and value.startswith("${"):
        raise ValueError(f"the checkpoint's {name} is {value!r}, an interpolation that names no value in the "
                         f"checkpoint; set {name} to a value in its config to import it")  # fmt: skip
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = numeric and float(value).is_integer()
    else:
        ok = numeric
    if not ok:
        what = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise ValueError(f"the checkpoint's {name} is {_short(value)}, not {what}; set it to {what} in its config "
                         "to import it")  # fmt: skip
    return kind(value)


def _get(cfg: dict, key: str, default):
    """``cfg[key]``, or ``default`` where it is absent or None."""
    value = cfg.get(key, default)
    return default if value is None and default is not None else value


# Typed reads: a value of the wrong type is refused naming its own field (not one compared with it).
def _integer(cfg: dict, key: str, default, at: str = "model") -> int:
    """``cfg[key]`` as a whole number (``at.key`` names it in the error)."""
    return _typed(_get(cfg, key, default), f"{at}.{key}", int)


def _number(cfg: dict, key: str, default, at: str = "model") -> float:
    """``cfg[key]`` as a number (``at.key`` names it in the error)."""
    return _typed(_get(cfg, key, default), f"{at}.{key}", float)


def _flag(cfg: dict, key: str, default, at: str = "model") -> bool:
    """``cfg[key]`` as true or false (``at.key`` names it in the error)."""
    return _typed(_get(cfg, key, default), f"{at}.{key}", bool)


def _refuse(key: str, why: str) -> None:
    """The one-line error of a setting d2v2 does not implement."""
    raise ValueError(f"the checkpoint sets {key}, which d2v2 does not implement ({why}); it cannot be imported")


def _require(cfg: dict, key: str, expected, why: str, where: str = "model") -> None:
    """Refuse ``cfg[key]`` (named ``where.key``) where it is set to anything but ``expected``."""
    if key in cfg and cfg[key] != expected and cfg[key] is not None:
        _refuse(f"{where}.{key}={cfg[key]!r}", why)


def _closest_size(modality: str, dims: dict) -> str:
    sizes = ENCODER_SIZES[modality]
    for name, size in sizes.items():
        if all(getattr(size, k) == v for k, v in dims.items()):
            return name
    known = [name for name in sizes if (modality, name) in DATA2VEC2_PRESETS]
    return min(known, key=lambda name: abs(sizes[name].embed_dim - dims["embed_dim"]))


def data2vec2_from_fairseq(model_cfg: dict, state: dict[str, torch.Tensor]) -> ImportedConfig:
    """d2v2's config for the fairseq model config ``model_cfg`` (plain data) whose student weights
    (prefix stripped) are ``state``. ValueError naming the field for what d2v2 cannot reproduce."""
    name = model_cfg.get("_name")
    if name is not None and name != "data2vec_multi":
        raise ValueError(f"the checkpoint's model is {name!r}; d2v2 imports data2vec 2.0 (data2vec_multi) checkpoints "
                         "and their fine-tunes, and CTC fine-tunes of wav2vec 2.0 and data2vec 1.0")  # fmt: skip
    modality = _modality_of(model_cfg, state)
    where = f"model.modalities.{modality}"
    mod = _section(_section(model_cfg.get("modalities"), "model.modalities").get(modality), where)
    decoder = _section(mod.get("decoder"), f"{where}.decoder")
    notes: list[str] = []

    embed_dim = _integer(model_cfg, "embed_dim", 768)

    _require(model_cfg, "layer_norm_first", False, "its blocks are post-norm, as every released config")
    _require(model_cfg, "end_of_block_targets", False, "targets are FFN outputs, as every released config")
    _require(model_cfg, "norm_affine", True, "its LayerNorms are affine")
    _require(model_cfg, "batch_norm_target_layer", False, "targets use instance or layer norm")
    if model_cfg.get("shared_decoder") is not None:
        _refuse("model.shared_decoder", "one decoder per modality")
    _require(mod, "learned_alibi", False, "ALiBi is the fixed geometric bias", where)
    _require(mod, "learned_alibi_scale_per_layer", False, "one ALiBi scale per head, shared by all layers", where)
    _require(mod, "use_alibi_encoder", modality == "audio", "ALiBi for audio only, as the released configs", where)
    _require(mod, "num_extra_tokens", 1 if modality == "image" else 0, "one CLS token for images, none otherwise", where)
    for key in ("add_positions_masked", "add_positions_all"):
        _require(decoder, key, False, "the decoder sees no positions", f"{where}.decoder")
    if modality == "image":
        _require(mod, "fixed_positions", True, "fixed sin-cos positions", where)
        _require(mod, "transformer_decoder", False, "a convolutional decoder", where)
        _require(mod, "embed_dim", embed_dim, "the patch embedding is model-wide", where)
    if modality == "audio":
        _require(mod, "extractor_mode", "layer_norm", "the CNN has a LayerNorm in every layer", where)
        _require(mod, "conv_pos_pre_ln", False, "no LayerNorm before the positional convs", where)
    if modality == "text":
        for key, expected in (("no_scale_embedding", True), ("layernorm_embedding", True), ("learned_pos", True),
                              ("no_token_positional_embeddings", False)):  # fmt: skip
            _require(mod, key, expected, "unscaled token + learned positions + LayerNorm", where)
    for key, default in (("dropout_input", 0.0), ("recon_loss", 0.0), ("mae_init", False)):
        if _get(model_cfg, key, default) != default:
            notes.append(f"model.{key}={model_cfg[key]!r} (training only) is not carried over")
    if modality == "audio" and mod.get("learned_alibi_scale") is False:
        notes.append(f"{where}.learned_alibi_scale=False: d2v2 trains the ALiBi scale when pretraining goes on")
    if _get(model_cfg, "start_drop_path_rate", 0.0) or _get(mod, "start_drop_path_rate", 0.0):
        notes.append("drop path starts at 0 in d2v2 (linear up to end_drop_path_rate over all blocks)")

    values: dict = dict(
        embed_dim=embed_dim,
        num_heads=_integer(model_cfg, "num_heads", 12),
        depth=_integer(model_cfg, "depth", 8),
        prenet_depth=_integer(mod, "prenet_depth", 4, where),
        mlp_ratio=_number(model_cfg, "mlp_ratio", 4.0),
        norm_eps=_number(model_cfg, "norm_eps", 1e-6),
        encoder_dropout=_number(model_cfg, "encoder_dropout", 0.1),
        attention_dropout=_number(model_cfg, "attention_dropout", 0.1),
        activation_dropout=_number(model_cfg, "activation_dropout", 0.0),
        post_mlp_dropout=_number(model_cfg, "post_mlp_drop", 0.1),
        drop_path_rate=max(_number(model_cfg, "end_drop_path_rate", 0.0), _number(mod, "end_drop_path_rate", 0.0, where)),
        layerdrop=_number(model_cfg, "layerdrop", 0.0),
        prenet_layerdrop=_number(mod, "prenet_layerdrop", 0.0, where),
        prenet_dropout=_number(mod, "prenet_dropout", 0.0, where),
        average_top_k_layers=_integer(model_cfg, "average_top_k_layers", 8),
        clone_batch=_integer(model_cfg, "clone_batch", 1),
        loss_beta=_number(model_cfg, "loss_beta", 0.0),
        loss_scale=None if model_cfg.get("loss_scale") is None else _number(model_cfg, "loss_scale", None),
        cls_loss=_number(model_cfg, "cls_loss", 0.0),
        min_target_var=_number(model_cfg, "min_target_var", 0.1),
        min_pred_var=_number(model_cfg, "min_pred_var", 0.01),
        mask_ratio=_number(mod, "mask_prob", 0.7, where),
        mask_length=_integer(mod, "mask_length", 5, where),
        mask_prob_adjust=_number(mod, "mask_prob_adjust", 0.0, where),
        mask_noise_std=_number(mod, "mask_noise_std", 0.01, where),
        local_grad_mult=_number(mod, "local_grad_mult", 1.0, where),
        target_layer_norm="instance" if model_cfg.get("instance_norm_target_layer")
        else "layer" if model_cfg.get("layer_norm_target_layer") else None,
        target_final_norm="instance" if model_cfg.get("instance_norm_targets")
        else "layer" if model_cfg.get("layer_norm_targets") else None,
    )  # fmt: skip
    for key in ("ema_decay", "ema_end_decay"):
        if isinstance(model_cfg.get(key), (int, float)):
            values[key] = float(model_cfg[key])
    if isinstance(model_cfg.get("ema_anneal_end_step"), int):  # an unresolved ${optimization.max_update} stays default
        values["ema_anneal_end_step"] = model_cfg["ema_anneal_end_step"]
    if decoder:
        values.update(
            decoder_dim=_integer(decoder, "decoder_dim", 384, f"{where}.decoder"),
            decoder_kernel=_integer(decoder, "decoder_kernel", 5, f"{where}.decoder"),
            decoder_layers=_integer(decoder, "decoder_layers", 5, f"{where}.decoder"),
            decoder_groups=_integer(decoder, "decoder_groups", 16, f"{where}.decoder"),
            decoder_residual=_flag(decoder, "decoder_residual", True, f"{where}.decoder"),
            projection_layers=_integer(decoder, "projection_layers", 1, f"{where}.decoder"),
            projection_ratio=_number(decoder, "projection_ratio", 2.0, f"{where}.decoder"),
            decoder_input_dropout=_number(decoder, "input_dropout", 0.1, f"{where}.decoder"),
        )
    prefix = f"modality_encoders.{TAGS[modality]}."
    if modality == "image":
        values.update(image_size=_integer(mod, "input_size", 224, where), patch_size=_integer(mod, "patch_size", 16, where),
                      in_chans=_integer(mod, "in_chans", 3, where))  # fmt: skip
    elif modality == "audio":
        values.update(
            conv_feature_layers=parse_conv_spec(
                _get(mod, "feature_encoder_spec", DEFAULT_CONV_SPEC)
            ),
            conv_pos_width=_integer(mod, "conv_pos_width", 95, where),
            conv_pos_depth=_integer(mod, "conv_pos_depth", 5, where),
            conv_pos_groups=_integer(mod, "conv_pos_groups", 16, where),
            alibi_scale_init=_number(mod, "alibi_scale", 1.0, where),
        )
    else:
        tokens = state.get(prefix + "local_encoder.embed_tokens.weight")
        positions = state.get(prefix + "local_encoder.embed_positions.weight")
        if tokens is None or positions is None:
            raise ValueError("the checkpoint's text encoder lacks its token or position embeddings")
        max_positions = _integer(mod, "max_source_positions", 512, where)
        padding_idx = positions.shape[0] - max_positions - 1  # fairseq: max_positions + padding_idx + 1 rows
        if not 0 <= padding_idx < tokens.shape[0]:
            raise ValueError(f"the text position table has {positions.shape[0]} rows, too few for "
                             f"max_source_positions={max_positions}; the config and weights disagree")  # fmt: skip
        values.update(vocab_size=int(tokens.shape[0]), max_positions=max_positions, padding_idx=padding_idx,
                      embed_dropout=_number(mod, "dropout", 0.1, where))  # fmt: skip
    dims = {k: values[k] for k in ("embed_dim", "num_heads", "prenet_depth", "depth")}
    size = _closest_size(modality, dims)
    try:
        config = data2vec2_config(modality, size, **values)
    except ValueError as e:
        raise ValueError(f"the checkpoint's config does not make a valid d2v2 model: {e}") from None
    return ImportedConfig(config, size, notes)


def wav2vec_from_fairseq(model_cfg: dict) -> ImportedConfig:
    """d2v2's config for a fairseq wav2vec 2.0 (``Wav2Vec2Config``) or data2vec 1.0 audio
    (``Data2VecAudioConfig``) model config (plain data): the encoder's fields. The pretraining
    objective's (quantiser, targets) stay the preset's: a recogniser has no use for them. ValueError
    naming the field for an encoder d2v2 does not build (pre-norm blocks, conformer layers, ...)."""
    name = model_cfg.get("_name") or model_cfg.get("arch")
    method, description = WAV2VEC_MODELS[name]
    data2vec = method == "data2vec"
    _require(model_cfg, "layer_norm_first", False,
             "post-norm blocks, as wav2vec 2.0 base, LibriSpeech large and data2vec 1.0")  # fmt: skip
    _require(model_cfg, "layer_type", "transformer", "transformer blocks")
    _require(model_cfg, "activation_fn", "gelu", "GELU feed-forward layers")
    _require(model_cfg, "conv_bias", False, "a CNN without biases")
    _require(model_cfg, "conv_pos_batch_norm", False, "no norm in the positional convolution")
    depth = _integer(model_cfg, "pos_conv_depth", 1)
    if data2vec:
        _require(model_cfg, "extractor_mode", "layer_norm", "data2vec 1.0's CNN has a LayerNorm in every layer")
        if depth < 2:
            _refuse(f"model.pos_conv_depth={depth}", "data2vec 1.0's positions are a stack of convolutions")
    else:
        _require(model_cfg, "pos_conv_depth", 1, "one weight-normalised positional convolution")
    embed_dim = _integer(model_cfg, "encoder_embed_dim", 768)
    dropout = _number(model_cfg, "dropout", 0.1)
    values: dict = dict(
        embed_dim=embed_dim,
        num_heads=_integer(model_cfg, "encoder_attention_heads", 12),
        depth=_integer(model_cfg, "encoder_layers", 12),
        mlp_ratio=_integer(model_cfg, "encoder_ffn_embed_dim", 3072) / embed_dim,
        norm_eps=1e-5,  # fairseq's LayerNorm default, every norm of these models
        conv_feature_layers=parse_conv_spec(_get(model_cfg, "conv_feature_layers", DEFAULT_CONV_SPEC)),
        encoder_dropout=dropout,
        attention_dropout=_number(model_cfg, "attention_dropout", 0.1),
        activation_dropout=_number(model_cfg, "activation_dropout", 0.0),
        layerdrop=_number(model_cfg, "encoder_layerdrop", 0.0),
    )
    if data2vec:  # fairseq's dropout also follows the input LayerNorm and the FFN (TransformerEncoder)
        values.update(input_dropout=dropout, post_mlp_dropout=dropout, conv_pos_width=_integer(model_cfg, "conv_pos", 128),
                      conv_pos_depth=depth, conv_pos_groups=_integer(model_cfg, "conv_pos_groups", 16))  # fmt: skip
        if "average_top_k_layers" in model_cfg:
            values["average_top_k_layers"] = _integer(model_cfg, "average_top_k_layers", 8)
    else:
        values.update(extractor_mode=_get(model_cfg, "extractor_mode", "default"),
                      dropout_input=_number(model_cfg, "dropout_input", 0.0),
                      conv_pos_kernel=_integer(model_cfg, "conv_pos", 128),
                      conv_pos_groups=_integer(model_cfg, "conv_pos_groups", 16))  # fmt: skip
    presets = DATA2VEC1_PRESETS if data2vec else WAV2VEC2_PRESETS
    sizes = [size for modality, size in presets if modality == "audio"]
    size = min(sizes, key=lambda s: abs(ENCODER_SIZES["audio"][s].embed_dim - embed_dim))
    try:
        config = method_config(method, "audio", size, **values)
    except ValueError as e:
        raise ValueError(f"the checkpoint's config does not make a valid d2v2 {description} model: {e}") from None
    return ImportedConfig(config, size, [], method, description)
