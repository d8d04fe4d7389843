"""d2v2.models: masking, encoders, transformer blocks, conv decoders, the modalities and the methods.

Every module calls ``d2v2.kernels`` ops and nothing lower. A method is a ``Method`` (``method``):
``forward(batch) -> dict`` with ``loss`` and logged values, ``after_step(step)``, ``health``,
``param_groups``, ``encoder`` and ``forward_features``; what differs by modality lives in the
``Modality`` objects (``modalities``). ``methods.METHODS`` names every method. ``load_pretrained``
reads an encoder that ``d2v2 export`` wrote in d2v2's own format (``pretrained``).
"""

from .blocks import Attention, DropPath, Mlp, PostNormBlock, PreNormBlock, forward_blocks, init_bert_params
from .data2vec1 import Data2Vec1, Data2Vec1Encoder
from .data2vec1_config import DATA2VEC1_PRESETS, Data2Vec1Config, data2vec1_config
from .data2vec2 import Data2Vec2
from .data2vec2_config import DATA2VEC2_PRESETS, Data2Vec2Config, data2vec2_config
from .data2vec2_encoder import Data2Vec2Encoder
from .decoders import Decoder1d, Decoder2d
from .encoders import (
    WAV2VEC2_CONV_LAYERS,
    AudioFeatureEncoder,
    ConvPositionalEncoder,
    PatchEmbed,
    TokenEmbedding,
    WeightNormConvPositions,
    alibi_slopes,
    audio_num_frames,
    frame_padding_mask,
    sincos_pos_embed_2d,
)
from .mae import MAE, MAEDecoder, MAEEncoder
from .mae_config import MAE_PRESETS, MAEConfig, mae_config
from .masking import (
    beit_block_mask,
    inverse_block_mask,
    mask_to_ids,
    mlm_span_mask,
    random_mask,
    span_mask,
    wav2vec_span_mask,
)
from .method import Method, batch_masks
from .methods import DEFAULT_METHOD, METHODS, build_method, method_config, method_entry
from .mlm import MLM, LMHead, MLMEncoder
from .mlm_config import MLM_PRESETS, MLMConfig, mlm_config
from .modalities import MODALITIES, AudioModality, ImageModality, Modality, TextModality, modality_for
from .pretrained import load_pretrained, save_pretrained
from .quantizer import GumbelVectorQuantizer
from .sizes import ENCODER_SIZES, EncoderSize, count_parameters, encoder_size
from .teacher import ema_decay_schedule, ema_update
from .wav2vec2 import Wav2Vec2, Wav2Vec2Encoder
from .wav2vec2_config import WAV2VEC2_PRESETS, Wav2Vec2Config, wav2vec2_config

__all__ = [
    "Attention", "AudioFeatureEncoder", "AudioModality", "ConvPositionalEncoder", "DATA2VEC1_PRESETS",
    "DATA2VEC2_PRESETS", "DEFAULT_METHOD", "Data2Vec1", "Data2Vec1Config", "Data2Vec1Encoder", "Data2Vec2", "Data2Vec2Config",
    "Data2Vec2Encoder", "Decoder1d", "Decoder2d", "DropPath", "ENCODER_SIZES", "EncoderSize",
    "GumbelVectorQuantizer", "ImageModality", "LMHead", "MAE", "MAEConfig", "MAEDecoder", "MAEEncoder",
    "MAE_PRESETS", "METHODS", "MLM", "MLMConfig", "MLMEncoder", "MLM_PRESETS", "MODALITIES", "Method", "Mlp",
    "Modality", "PatchEmbed", "PostNormBlock", "PreNormBlock", "TextModality", "TokenEmbedding",
    "WAV2VEC2_CONV_LAYERS", "WAV2VEC2_PRESETS", "Wav2Vec2", "Wav2Vec2Config", "Wav2Vec2Encoder",
    "WeightNormConvPositions", "alibi_slopes", "audio_num_frames", "batch_masks", "beit_block_mask", "build_method",
    "count_parameters", "data2vec1_config", "data2vec2_config", "ema_decay_schedule", "ema_update", "encoder_size",
    "forward_blocks", "frame_padding_mask", "init_bert_params", "inverse_block_mask", "load_pretrained", "mae_config", "mask_to_ids",
    "method_config", "method_entry", "mlm_config", "mlm_span_mask", "modality_for", "random_mask",
    "save_pretrained", "sincos_pos_embed_2d", "span_mask", "wav2vec2_config", "wav2vec_span_mask",
]  # fmt: skip
