"""``d2v2 export``: a run's pretrained encoder as ``model.safetensors`` + ``config.json`` (+ tokenizer).

Where d2v2's encoder really is the architecture of a standard class, the export uses that class's
parameter names and config, so the folder loads straight into it:

| method, modality        | target                                   | what makes it the same model |
|-------------------------|------------------------------------------|------------------------------|
| data2vec 2.0 text       | HF ``Data2VecTextModel``                  | no prenet: token + learned positions, LayerNorm, post-norm blocks = RoBERTa |
| data2vec 1.0 text       | HF ``Data2VecTextModel``                  | RoBERTa's encoder |
| mlm text                | HF ``RobertaModel``                       | RoBERTa's encoder |
| data2vec 1.0 audio      | HF ``Data2VecAudioModel``                 | LayerNorm CNN, 5-layer conv positions, LayerNorm, post-norm blocks |
| wav2vec2 audio          | HF ``Wav2Vec2Model``                      | CNN, one weight-normalised conv position, LayerNorm, post-norm blocks |
| data2vec 1.0 image      | HF ``Data2VecVisionModel``                | BEiT's pre-norm layer-scale blocks and final LayerNorm, absolute positions |
| mae image               | timm ``vit_*`` (``VisionTransformer``)    | pre-norm ViT, CLS, final LayerNorm |

Everything else (data2vec 2.0 images: a LayerNorm on the embeddings and post-norm blocks; data2vec
2.0 audio: ALiBi attention bias; data2vec 2.0 text with prenet blocks; configs off the standard
values) is written in d2v2's own format (``d2v2.models.pretrained``), which ``d2v2.models.load_pretrained``
reads; ``--format d2v2`` asks for it for any method.

Exact mappings (differences that change nothing, checked to 1e-5 by tests/engine/test_export.py):
the fused qkv projection is split into query/key/value; text positions get RoBERTa's offset of
padding_idx + 1 zero rows and a zero token-type row; the image positions get a zero CLS row (d2v2's
CLS has no position); BEiT has no key bias, and ours is dropped: it adds q . b_k to every score of a
query, which the softmax cancels. Limits: HF's text models derive positions from the pad ids, so
give them the same padding as the ids (pad tokens where padding_mask is True); HF's audio models
zero padded frames before the conv positions, which data2vec 1.0's encoder does not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from d2v2.models import DEFAULT_METHOD, save_pretrained
from d2v2.models.pretrained import CONFIG_FILE, WEIGHTS_FILE, write_folder

from .checkpoint import method_from_checkpoint, resolve_checkpoint, run_folder_of
from .runfolder import require_new, write_failure

WEIGHTS = ("teacher", "student")
FORMATS = ("auto", "d2v2")
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


def standard_target(method: str, cfg) -> tuple[Target | None, str]:
    """The standard class whose architecture ``method`` with ``cfg`` really is, or (None, why not)."""
    modality = cfg.modality
    if modality == "text" and getattr(cfg, "padding_idx", None) is None:
        return None, "no padding_idx, which RoBERTa's position numbering needs"
    if method == "data2vec2":
        if modality == "text":
            if cfg.prenet_depth > 0:
                return None, "its prenet (a LayerNorm and blocks after the embedding LayerNorm) has no RoBERTa counterpart"
            return DATA2VEC_TEXT, "no prenet: RoBERTa's encoder"
        if modality == "image":
            return None, ("its blocks are post-norm after a LayerNorm on the embeddings; timm's and HF's ViTs "
                          "are pre-norm")  # fmt: skip
        return None, "its attention has a learned-scale ALiBi bias, which no HF or timm audio model has"
    if method in ("data2vec", "mlm") and modality == "text":
        return (ROBERTA if method == "mlm" else DATA2VEC_TEXT), "RoBERTa's encoder"
    if method == "data2vec" and modality == "audio":
        if cfg.layer_norm_first or not cfg.input_norm or cfg.alibi or cfg.norm_eps != 1e-5:
            return None, "its config leaves data2vec 1.0 audio's architecture (pre-norm, no input LayerNorm, ALiBi or norm_eps != 1e-5)"
        return DATA2VEC_AUDIO, "wav2vec 2.0's encoder with 5 conv position layers"
    if method == "data2vec" and modality == "image":
        if not cfg.layer_norm_first:
            return None, "post-norm vision blocks (layer_norm_first false) have no BEiT counterpart"
        return DATA2VEC_VISION, "BEiT's pre-norm layer-scale blocks with absolute positions"
    if method == "wav2vec2":
        if cfg.norm_eps != 1e-5:
            return None, f"norm_eps {cfg.norm_eps}: HF's feature projection LayerNorm shares it, d2v2's uses 1e-5"
        return WAV2VEC2, "wav2vec 2.0's encoder"
    if method == "mae":
        if cfg.norm_eps != 1e-6:
            return None, f"norm_eps {cfg.norm_eps}: timm's ViT uses 1e-6"
        return TIMM_VIT, "a pre-norm ViT"
    return None, f"no standard class matches {method} {modality}"


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


def encoder_state(method, weights: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors (d2v2 names): the student's, or the EMA teacher's with the student's for
    the parts the teacher does not own (what ``probe_features`` runs: e.g. the audio CNN, the text
    embedding)."""
    state = dict(method.encoder.state_dict())
    if weights == "teacher":
        teacher = method.teacher.state_dict()
        unknown = sorted(set(teacher) - set(state))
        if unknown:  # a teacher part with no student twin: the encoder could not hold it
            raise RuntimeError(f"teacher weights {unknown[:3]} have no place in the encoder")
        state.update(teacher)
    return state


def export(
    checkpoint: str, out: str, weights: str | None = None, fmt: str = "auto", tokenizer: bool = True, log=print
) -> dict:
    """Export a checkpoint's encoder into folder ``out`` (written whole under a temporary name, then
    renamed). Returns what was written: target, weights, files.

    Args:
        checkpoint: a run folder, checkpoint folder or state.pt.
        out: a new (or empty) folder.
        weights: "teacher" (default where the method has an EMA teacher) or "student".
        fmt: "auto" (the standard class where one matches, else d2v2's own format) or "d2v2".
        tokenizer: copy a text run's tokenizer.json (and its HF tokenizer_config.json).
    """
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"--weights must be teacher or student, got {weights!r}")
    if fmt not in FORMATS:
        raise ValueError(f"--format must be auto or d2v2, got {fmt!r}")
    out_dir = Path(out)
    require_new(out_dir, "export")
    state_file = resolve_checkpoint(checkpoint)
    method, run_config = method_from_checkpoint(checkpoint)
    name = run_config.get("method", DEFAULT_METHOD)
    has_teacher = getattr(method, "teacher", None) is not None
    weights = weights or ("teacher" if has_teacher else "student")
    if weights == "teacher" and not has_teacher:
        raise ValueError(f"--weights teacher: {name} has no EMA teacher; use --weights student")
    cfg = method.cfg
    state = encoder_state(method, weights)
    step = _step_of(state_file)
    provenance = {"method": name, "weights": weights, "source": str(state_file), "step": step}

    target, why = standard_target(name, cfg) if fmt == "auto" else (None, "--format d2v2")
    # An empty --out (perhaps a mount point, which can be neither removed nor renamed over) is written
    # into; a new one is written whole under a temporary name beside it, then renamed.
    into = out_dir.is_dir()
    tmp = out_dir / f".export.tmp-{os.getpid()}" if into else out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if target is None:
            save_pretrained(state, name, cfg, tmp, weights, source=provenance["source"], step=step)
        else:
            # data2vec 1.0's mask vector (the student's) lives on the method; HF has a slot for it.
            mask_emb = getattr(method, "mask_emb", None)
            extra = {} if mask_emb is None or "mask_emb" in state else {"mask_emb": mask_emb}
            _save_standard(target, {**state, **extra}, cfg, tmp, provenance)
        files = [WEIGHTS_FILE, CONFIG_FILE]
        if tokenizer and cfg.modality == "text":
            files += _copy_tokenizer(run_config, cfg, tmp, run_folder_of(state_file))
        if into:
            for path in tmp.iterdir():
                os.replace(path, out_dir / path.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out_dir)
    except OSError as e:  # read-only or full: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(out_dir, e, created=not into) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    label = f"{target.name} ({target.library})" if target else "d2v2's own format (d2v2.models.load_pretrained)"
    log(f"{name} {cfg.modality}, {weights} weights, step {step} -> {out_dir}: {label}")
    if target is None and fmt == "auto":
        log(f"no standard class: {why}")
    return {"target": target.name if target else "d2v2", "library": target.library if target else "d2v2",
            "weights": weights, "why": why, "files": files, "out": str(out_dir)}  # fmt: skip


def _step_of(state_file: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", state_file.parent.name)
    return int(match[1]) if match else 0


def _save_standard(target: Target, state: dict, cfg, folder: Path, provenance: dict) -> None:
    config = target.config(cfg)
    config["d2v2"] = provenance  # where the weights came from; the libraries ignore unknown keys
    write_folder(folder, target.state(state, cfg), config)


def _copy_tokenizer(run_config: dict, cfg, folder: Path, run_dir: Path | None) -> list[str]:
    """The run's tokenizer.json and an HF tokenizer_config.json beside it. A text encoder is useless
    without the tokenizer it was trained with, so a run whose tokenizer cannot be found stops the export."""
    from .probe_sets import TOKENIZER_FILE, run_tokenizer

    try:
        tok = run_tokenizer(run_config, run_dir)
    except (ValueError, FileNotFoundError) as e:
        where = f"{run_dir / TOKENIZER_FILE}" if run_dir is not None else "the run folder's tokenizer.json"
        raise ValueError(f"the text run's tokenizer cannot be found ({str(e).splitlines()[0]}); put it at {where}, "
                         f"or restore the run's data.path {run_config.get('data', {}).get('path')!r}") from e
    tok.save(str(folder / "tokenizer.json"))
    special = {name: token for name, token in (("bos_token", "<s>"), ("pad_token", "<pad>"), ("eos_token", "</s>"),
               ("unk_token", "<unk>"), ("mask_token", "<mask>")) if tok.token_to_id(token) is not None}  # fmt: skip
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_positions, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
