"""fairseq's data2vec 2.0 model config (``Data2VecMultiConfig``, as plain data) -> d2v2's ``Data2Vec2Config``.

The fields map one to one where both implement the same thing (``depth``, ``embed_dim``,
``average_top_k_layers``, ``clone_batch``, the modality's ``prenet_depth``, masking and ``decoder``
settings, ...). A setting d2v2 does not implement is refused when it changes the encoder's output
(pre-norm blocks, end-of-block targets, no-affine norms, a per-layer or learned ALiBi table, decoder
positions, a shared decoder, another feature extractor mode) and reported as ignored when it only
changed fairseq's training (``dropout_input``, ``local_grad_mult``, ``recon_loss``, ...).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import torch

from d2v2.models import ENCODER_SIZES
from d2v2.models.data2vec2 import DATA2VEC2_PRESETS, Data2Vec2Config, data2vec2_config

from .fairseq_keys import TAGS

__all__ = ["ImportedConfig", "pretraining_config", "data2vec2_from_fairseq", "parse_conv_spec"]


@dataclass
class ImportedConfig:
    """The d2v2 config of an imported model and what the mapping had to say about it."""

    config: Data2Vec2Config
    size: str
    """The size preset the config starts from (its dimensions are overridden where they differ)."""
    notes: list[str] = field(default_factory=list)
    """Settings that only changed fairseq's training and are not carried over."""


def pretraining_config(model_cfg: dict) -> tuple[dict, str | None]:
    """The data2vec 2.0 model config inside a checkpoint's model config, and the fine-tuning model's
    kind when it is a fine-tune (its ``w2v_args`` / ``pretrained_model_args`` hold the pretraining
    run's whole config, whose ``model`` entry is the one we need)."""
    for key in ("w2v_args", "pretrained_model_args"):
        inner = model_cfg.get(key)
        if isinstance(inner, dict):
            inner_model = inner.get("model", inner)
            if isinstance(inner_model, dict):
                return inner_model, str(model_cfg.get("_name", key))
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
        raise ValueError(f"the checkpoint's model is {name!r}; only data2vec 2.0 (data2vec_multi) checkpoints "
                         "and their fine-tunes are imported")  # fmt: skip
    modality = _modality_of(model_cfg, state)
    where = f"model.modalities.{modality}"
    mod = _section(_section(model_cfg.get("modalities"), "model.modalities").get(modality), where)
    decoder = _section(mod.get("decoder"), f"{where}.decoder")
    notes: list[str] = []

    def get(cfg: dict, key: str, default):
        value = cfg.get(key, default)
        return default if value is None and default is not None else value

    # Typed reads: a value of the wrong type is refused naming its own field (not one compared with it).
    def integer(cfg: dict, key: str, default, at: str = "model") -> int:
        return _typed(get(cfg, key, default), f"{at}.{key}", int)

    def number(cfg: dict, key: str, default, at: str = "model") -> float:
        return _typed(get(cfg, key, default), f"{at}.{key}", float)

    def flag(cfg: dict, key: str, default, at: str = "model") -> bool:
        return _typed(get(cfg, key, default), f"{at}.{key}", bool)

    embed_dim = integer(model_cfg, "embed_dim", 768)

    def refuse(key: str, why: str) -> None:
        raise ValueError(f"the checkpoint sets {key}, which d2v2 does not implement ({why}); it cannot be imported")

    def require(cfg: dict, key: str, expected, why: str, where: str = "model") -> None:
        if key in cfg and cfg[key] != expected and cfg[key] is not None:
            refuse(f"{where}.{key}={cfg[key]!r}", why)

    require(model_cfg, "layer_norm_first", False, "its blocks are post-norm, as every released config")
    require(model_cfg, "end_of_block_targets", False, "targets are FFN outputs, as every released config")
    require(model_cfg, "norm_affine", True, "its LayerNorms are affine")
    require(model_cfg, "batch_norm_target_layer", False, "targets use instance or layer norm")
    if model_cfg.get("shared_decoder") is not None:
        refuse("model.shared_decoder", "one decoder per modality")
    require(mod, "learned_alibi", False, "ALiBi is the fixed geometric bias", where)
    require(mod, "learned_alibi_scale_per_layer", False, "one ALiBi scale per head, shared by all layers", where)
    require(mod, "use_alibi_encoder", modality == "audio", "ALiBi for audio only, as the released configs", where)
    require(mod, "num_extra_tokens", 1 if modality == "image" else 0, "one CLS token for images, none otherwise", where)
    for key in ("add_positions_masked", "add_positions_all"):
        require(decoder, key, False, "the decoder sees no positions", f"{where}.decoder")
    if modality == "image":
        require(mod, "fixed_positions", True, "fixed sin-cos positions", where)
        require(mod, "transformer_decoder", False, "a convolutional decoder", where)
        require(mod, "embed_dim", embed_dim, "the patch embedding is model-wide", where)
    if modality == "audio":
        require(mod, "extractor_mode", "layer_norm", "the CNN has a LayerNorm in every layer", where)
        require(mod, "conv_pos_pre_ln", False, "no LayerNorm before the positional convs", where)
    if modality == "text":
        for key, expected in (("no_scale_embedding", True), ("layernorm_embedding", True), ("learned_pos", True),
                              ("no_token_positional_embeddings", False)):  # fmt: skip
            require(mod, key, expected, "unscaled token + learned positions + LayerNorm", where)
    for key, default in (("dropout_input", 0.0), ("recon_loss", 0.0), ("mae_init", False)):
        if get(model_cfg, key, default) != default:
            notes.append(f"model.{key}={model_cfg[key]!r} (training only) is not carried over")
    if modality == "audio" and mod.get("learned_alibi_scale") is False:
        notes.append(f"{where}.learned_alibi_scale=False: d2v2 trains the ALiBi scale when pretraining goes on")
    if get(mod, "local_grad_mult", 1.0) != 1.0:
        notes.append(f"{where}.local_grad_mult={mod['local_grad_mult']!r} (training only) is not carried over")
    if get(model_cfg, "start_drop_path_rate", 0.0) or get(mod, "start_drop_path_rate", 0.0):
        notes.append("drop path starts at 0 in d2v2 (linear up to end_drop_path_rate over all blocks)")

    values: dict = dict(
        embed_dim=embed_dim,
        num_heads=integer(model_cfg, "num_heads", 12),
        depth=integer(model_cfg, "depth", 8),
        prenet_depth=integer(mod, "prenet_depth", 4, where),
        mlp_ratio=number(model_cfg, "mlp_ratio", 4.0),
        norm_eps=number(model_cfg, "norm_eps", 1e-6),
        encoder_dropout=number(model_cfg, "encoder_dropout", 0.1),
        attention_dropout=number(model_cfg, "attention_dropout", 0.1),
        activation_dropout=number(model_cfg, "activation_dropout", 0.0),
        post_mlp_dropout=number(model_cfg, "post_mlp_drop", 0.1),
        drop_path_rate=max(number(model_cfg, "end_drop_path_rate", 0.0), number(mod, "end_drop_path_rate", 0.0, where)),
        layerdrop=number(model_cfg, "layerdrop", 0.0),
        prenet_layerdrop=number(mod, "prenet_layerdrop", 0.0, where),
        prenet_dropout=number(mod, "prenet_dropout", 0.0, where),
        average_top_k_layers=integer(model_cfg, "average_top_k_layers", 8),
        clone_batch=integer(model_cfg, "clone_batch", 1),
        loss_beta=number(model_cfg, "loss_beta", 0.0),
        loss_scale=None if model_cfg.get("loss_scale") is None else number(model_cfg, "loss_scale", None),
        cls_loss=number(model_cfg, "cls_loss", 0.0),
        min_target_var=number(model_cfg, "min_target_var", 0.1),
        min_pred_var=number(model_cfg, "min_pred_var", 0.01),
        mask_ratio=number(mod, "mask_prob", 0.7, where),
        mask_length=integer(mod, "mask_length", 5, where),
        mask_prob_adjust=number(mod, "mask_prob_adjust", 0.0, where),
        mask_noise_std=number(mod, "mask_noise_std", 0.01, where),
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
            decoder_dim=integer(decoder, "decoder_dim", 384, f"{where}.decoder"),
            decoder_kernel=integer(decoder, "decoder_kernel", 5, f"{where}.decoder"),
            decoder_layers=integer(decoder, "decoder_layers", 5, f"{where}.decoder"),
            decoder_groups=integer(decoder, "decoder_groups", 16, f"{where}.decoder"),
            decoder_residual=flag(decoder, "decoder_residual", True, f"{where}.decoder"),
            projection_layers=integer(decoder, "projection_layers", 1, f"{where}.decoder"),
            projection_ratio=number(decoder, "projection_ratio", 2.0, f"{where}.decoder"),
            decoder_input_dropout=number(decoder, "input_dropout", 0.1, f"{where}.decoder"),
        )
    prefix = f"modality_encoders.{TAGS[modality]}."
    if modality == "image":
        values.update(image_size=integer(mod, "input_size", 224, where), patch_size=integer(mod, "patch_size", 16, where),
                      in_chans=integer(mod, "in_chans", 3, where))  # fmt: skip
    elif modality == "audio":
        values.update(
            conv_feature_layers=parse_conv_spec(
                get(mod, "feature_encoder_spec", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]")
            ),
            conv_pos_width=integer(mod, "conv_pos_width", 95, where),
            conv_pos_depth=integer(mod, "conv_pos_depth", 5, where),
            conv_pos_groups=integer(mod, "conv_pos_groups", 16, where),
            alibi_scale_init=number(mod, "alibi_scale", 1.0, where),
        )
    else:
        tokens = state.get(prefix + "local_encoder.embed_tokens.weight")
        positions = state.get(prefix + "local_encoder.embed_positions.weight")
        if tokens is None or positions is None:
            raise ValueError("the checkpoint's text encoder lacks its token or position embeddings")
        max_positions = integer(mod, "max_source_positions", 512, where)
        padding_idx = positions.shape[0] - max_positions - 1  # fairseq: max_positions + padding_idx + 1 rows
        if not 0 <= padding_idx < tokens.shape[0]:
            raise ValueError(f"the text position table has {positions.shape[0]} rows, too few for "
                             f"max_source_positions={max_positions}; the config and weights disagree")  # fmt: skip
        values.update(vocab_size=int(tokens.shape[0]), max_positions=max_positions, padding_idx=padding_idx,
                      embed_dropout=number(mod, "dropout", 0.1, where))  # fmt: skip
    dims = {k: values[k] for k in ("embed_dim", "num_heads", "prenet_depth", "depth")}
    size = _closest_size(modality, dims)
    try:
        config = data2vec2_config(modality, size, **values)
    except ValueError as e:
        raise ValueError(f"the checkpoint's config does not make a valid d2v2 model: {e}") from None
    return ImportedConfig(config, size, notes)
