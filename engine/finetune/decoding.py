"""From a CTC head's per-frame logits to words, and the word and character error rates.

- Greedy (best path; the default, and what validation during training uses): the most likely symbol
  of every frame, repeats merged, blanks removed (fairseq's ``W2lViterbiDecoder`` without transitions,
  and the ``ctc`` criterion's own WER), then ``Letters.decode`` (``|`` a space).
- Beam search, optionally with a KenLM n-gram language model, through ``pyctcdecode`` (the optional
  extra ``d2v2[lm]``: ``pip install pyctcdecode kenlm``): ``beam`` hypotheses; ``lm_weight`` (alpha) and
  ``word_score`` (beta, a bonus per word) as pyctcdecode takes them (defaults 0.5 and 1.0, pyctcdecode's).
- WER and CER with ``jiwer`` over the whole split (errors summed over utterances, divided by the
  reference words or characters, spaces included for the CER).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from ..data.letters import BLANK, SPECIALS, WORD_BOUNDARY, Letters


@dataclass(kw_only=True, slots=True)
class DecodeConfig:
    """How a speech recognition run turns logits into words (``evaluate``, ``transcribe``, validation)."""

    beam: int = 0
    """0 = greedy (best path); else pyctcdecode's beam search with this many hypotheses (the ``lm`` extra)."""
    lm: str | None = None
    """A KenLM language model (``.arpa`` or ``.bin``, words in upper case as LibriSpeech's) for the beam search."""
    lm_weight: float = 0.5
    """The language model's weight (pyctcdecode's alpha)."""
    word_score: float = 1.0
    """A score added per word (pyctcdecode's beta)."""

    def __post_init__(self):
        if self.beam < 0:
            raise ValueError(f"decode.beam must be >= 0 (0 = greedy), got {self.beam}")
        if self.lm is not None and self.beam == 0:
            raise ValueError("decode.lm needs a beam search: give decode.beam (e.g. 100) with it")


def greedy_ids(logits: torch.Tensor, lengths: torch.Tensor, blank: int = BLANK) -> list[list[int]]:
    """Best-path symbol ids of each utterance: argmax of every frame of the first ``lengths[b]`` frames
    of ``logits`` [B, N, V], repeats merged, blanks removed."""
    best = logits.argmax(-1).cpu()
    out = []
    for row, length in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[: int(length)]).tolist()
        out.append([i for i in ids if i != blank])
    return out


class Decoder:
    """``decoder(logits [B, N, V], lengths [B]) -> [B words strings]`` for a vocabulary and a ``DecodeConfig``."""

    def __init__(self, letters: Letters, cfg: DecodeConfig | None = None):
        self.letters, self.cfg = letters, cfg or DecodeConfig()
        self.beam = None
        if self.cfg.beam > 0:
            self.beam = _pyctcdecoder(letters, self.cfg)

    @property
    def description(self) -> str:
        if self.beam is None:
            return "greedy"
        lm = f", LM {self.cfg.lm} (weight {self.cfg.lm_weight}, word score {self.cfg.word_score})" if self.cfg.lm else ""
        return f"beam {self.cfg.beam}{lm}"

    def __call__(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        if self.beam is None:
            return [self.letters.decode(ids) for ids in greedy_ids(logits, lengths)]
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        return [" ".join(self.beam.decode(lp[: int(n)], beam_width=self.cfg.beam).split())
                for lp, n in zip(log_probs, lengths.tolist())]  # fmt: skip


def _pyctcdecoder(letters: Letters, cfg: DecodeConfig):
    try:
        from pyctcdecode import build_ctcdecoder
    except ImportError:
        raise ValueError("beam search needs pyctcdecode (and kenlm for a language model): pip install 'd2v2[lm]'") from None
    # pyctcdecode's labels: "" for the blank, " " for the word boundary; the other specials never win.
    labels = ["" if i == BLANK else " " if s == WORD_BOUNDARY else f"<{i}>" if s in SPECIALS else s
              for i, s in enumerate(letters.symbols)]  # fmt: skip
    if cfg.lm is not None and importlib.util.find_spec("kenlm") is None:  # pyctcdecode itself only warns
        raise ValueError("decode.lm needs the kenlm package: pip install 'd2v2[lm]'")
    if cfg.lm is not None and not os.path.isfile(cfg.lm):
        raise FileNotFoundError(f"language model {cfg.lm} does not exist; give a KenLM .arpa or .bin file")
    return build_ctcdecoder(labels, kenlm_model_path=cfg.lm, alpha=cfg.lm_weight, beta=cfg.word_score)


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """``{"wer", "cer"}`` of the hypotheses against the references, over all of them (jiwer)."""
    import jiwer

    if not references or len(references) != len(hypotheses):
        raise ValueError(f"need as many hypotheses as references, and at least one; got {len(hypotheses)} and {len(references)}")
    return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses))}
