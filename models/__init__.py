"""d2v2.models: masking, encoders, transformer blocks, conv decoders and the data2vec 2.0 method.

Every module calls ``d2v2.kernels`` ops and nothing lower. ``Data2Vec2`` is the method:
``forward(batch) -> dict`` with ``loss`` and logged values, ``after_step(step)`` for the EMA teacher.
"""

from .blocks import Attention, DropPath, Mlp, PostNormBlock, PreNormBlock, forward_blocks, init_bert_params
from .data2vec2 import (
    DATA2VEC2_RECIPES,
    Data2Vec2,
    Data2Vec2Config,
    Data2Vec2Encoder,
    count_parameters,
    data2vec2_config,
    ema_decay_schedule,
    make_masks,
)
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
from .sizes import ENCODER_SIZES, EncoderSize, encoder_size

__all__ = [
    "Attention", "AudioFeatureEncoder", "ConvPositionalEncoder", "DATA2VEC2_RECIPES", "Data2Vec2",
    "Data2Vec2Config", "Data2Vec2Encoder", "Decoder1d", "Decoder2d", "DropPath", "ENCODER_SIZES",
    "EncoderSize", "Mlp", "PatchEmbed", "PostNormBlock", "PreNormBlock", "TokenEmbedding",
    "WAV2VEC2_CONV_LAYERS", "alibi_slopes", "audio_num_frames", "count_parameters", "data2vec2_config",
    "ema_decay_schedule", "encoder_size", "forward_blocks", "frame_padding_mask", "init_bert_params",
    "inverse_block_mask", "make_masks", "mask_to_ids", "random_mask", "sincos_pos_embed_2d", "span_mask",
]  # fmt: skip
