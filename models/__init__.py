"""d2v2.models: the methods, their shared building blocks and the seams between them.

Layout (timm's ``layers/`` + one folder per method, as torchtitan's ``models/<name>/``):

- ``layers/``: the building blocks every method shares: transformer blocks, local and positional
  encoders, the modality embeddings, conv decoders, masking, the quantiser, the EMA teacher helpers;
- ``data2vec2/``, ``data2vec1/``, ``mae/``, ``mlm/``, ``wav2vec2/``: one method each, its module
  (``model``) with its config and presets (``config``) beside it;
- ``tasks/``: fine-tuning models: any method's encoder with a task head (``Classifier``, ``PooledHead``,
  ``SentenceHead``; ``SpeechRecognizer`` with its ``CTCHead``);
- the seams: ``method`` (the ``Method`` protocol the engine relies on), ``modalities`` (what differs
  between images, speech and text), ``methods`` (the registry ``METHODS``, ``build_method``),
  ``config`` (the encoder config every method config inherits), ``sizes`` (the size table) and
  ``pretrained`` (``load_pretrained`` of an encoder ``d2v2 export`` wrote in d2v2's own format).

Every module calls ``d2v2.kernels`` ops and nothing lower.
"""

from .data2vec1.config import DATA2VEC1_PRESETS, Data2Vec1Config, data2vec1_config
from .data2vec1.model import Data2Vec1, Data2Vec1Encoder
from .data2vec2.config import DATA2VEC2_PRESETS, Data2Vec2Config, data2vec2_config
from .data2vec2.encoder import Data2Vec2Encoder
from .data2vec2.model import Data2Vec2
from .layers.blocks import Attention, DropPath, Mlp, PostNormBlock, PreNormBlock, forward_blocks, init_bert_params
from .layers.decoders import Decoder1d, Decoder2d
from .layers.mask_fill import MaskFill
from .layers.encoders import (
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
from .layers.masking import (
    beit_block_mask,
    inverse_block_mask,
    mask_to_ids,
    mlm_span_mask,
    random_mask,
    span_mask,
    wav2vec_span_mask,
)
from .layers.quantizer import GumbelVectorQuantizer
from .layers.teacher import ema_decay_schedule, ema_update
from .mae.config import MAE_PRESETS, MAEConfig, mae_config
from .mae.model import MAE, MAEDecoder, MAEEncoder
from .method import Method, batch_masks
from .methods import DEFAULT_METHOD, METHODS, build_method, method_config, method_entry
from .mlm.config import MLM_PRESETS, MLMConfig, mlm_config
from .mlm.model import MLM, LMHead, MLMEncoder
from .modalities import MODALITIES, AudioModality, ImageModality, Modality, TextModality, modality_for
from .pretrained import load_pretrained, save_pretrained
from .sizes import ENCODER_SIZES, EncoderSize, count_parameters, encoder_size
from .tasks import CTCHead, Classifier, FinetuneModel, PooledHead, SentenceHead, SpeechRecognizer
from .wav2vec2.config import WAV2VEC2_PRESETS, Wav2Vec2Config, wav2vec2_config
from .wav2vec2.model import Wav2Vec2, Wav2Vec2Encoder

__all__ = [
    "Attention", "AudioFeatureEncoder", "CTCHead", "Classifier", "FinetuneModel", "SpeechRecognizer", "MaskFill", "PooledHead", "SentenceHead", "AudioModality", "ConvPositionalEncoder", "DATA2VEC1_PRESETS",
    "DATA2VEC2_PRESETS", "DEFAULT_METHOD", "Data2Vec1", "Data2Vec1Config", "Data2Vec1Encoder", "Data2Vec2",
    "Data2Vec2Config", "Data2Vec2Encoder", "Decoder1d", "Decoder2d", "DropPath", "ENCODER_SIZES", "EncoderSize",
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
