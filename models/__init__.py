"""d2v2.models: masking, encoders, transformer blocks, conv decoders, the modalities and the methods.

Every module calls ``d2v2.kernels`` ops and nothing lower. A method is a ``Method`` (``method``):
``forward(batch) -> dict`` with ``loss`` and logged values, ``after_step(step)``, ``health``,
``param_groups``, ``encoder`` and ``forward_features``; what differs by modality lives in the
``Modality`` objects (``modalities``). ``methods.METHODS`` names every method.
"""

from .blocks import Attention, DropPath, Mlp, PostNormBlock, PreNormBlock, forward_blocks, init_bert_params
from .data2vec2 import Data2Vec2
from .data2vec2_config import DATA2VEC2_RECIPES, Data2Vec2Config, data2vec2_config
from .data2vec2_encoder import Data2Vec2Encoder
from .decoders import Decoder1d, Decoder2d
from .encoders import (
    WAV2VEC2_CONV_LAYERS,
    AudioFeatureEncoder,
    ConvPositionalEncoder,
    PatchEmbed,
    TokenEmbedding,
    alibi_slopes,
    audio_num_frames,
    frame_padding_mask,
    sincos_pos_embed_2d,
)
from .masking import inverse_block_mask, mask_to_ids, random_mask, span_mask
from .method import Method
from .methods import METHODS, build_method, method_config, method_entry
from .modalities import MODALITIES, AudioModality, ImageModality, Modality, TextModality, modality_for
from .sizes import ENCODER_SIZES, EncoderSize, count_parameters, encoder_size
from .teacher import ema_decay_schedule, ema_update

__all__ = [
    "Attention", "AudioFeatureEncoder", "AudioModality", "ConvPositionalEncoder", "DATA2VEC2_RECIPES",
    "Data2Vec2", "Data2Vec2Config", "Data2Vec2Encoder", "Decoder1d", "Decoder2d", "DropPath", "ENCODER_SIZES",
    "EncoderSize", "ImageModality", "METHODS", "MODALITIES", "Method", "Mlp", "Modality", "PatchEmbed",
    "PostNormBlock", "PreNormBlock", "TextModality", "TokenEmbedding", "WAV2VEC2_CONV_LAYERS", "alibi_slopes",
    "audio_num_frames", "build_method", "count_parameters", "data2vec2_config", "ema_decay_schedule",
    "ema_update", "encoder_size", "forward_blocks", "frame_padding_mask", "init_bert_params",
    "inverse_block_mask", "mask_to_ids", "method_config", "method_entry", "modality_for", "random_mask",
    "sincos_pos_embed_2d", "span_mask",
]  # fmt: skip
