"""The building blocks the methods share (timm's ``layers``): transformer blocks (``blocks``), local
encoders and positional encoders (``encoders``), the modality embeddings (``embeddings``), conv
decoders (``decoders``), masking (``masking``), the Gumbel quantiser (``quantizer``) and the EMA
teacher helpers (``teacher``). Import them from their modules, or from ``d2v2.models``."""
