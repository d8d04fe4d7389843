"""``d2v2 transcribe``: a fine-tuned speech recogniser's words for audio files, one line per file.

Each file is read whole as mono (channels averaged) at 16 kHz: another sample rate is resampled
(``audio.read_resampled``, band-limited), then normalised per utterance as in training. Decoding is
the run's (greedy by default), or the beam search and language model given.
"""

from __future__ import annotations

import time

import torch

from d2v2.models import SpeechRecognizer

from ..data import audio
from ..data.letters import Letters
from .config import finetune_config_from_dict
from .decoding import Decoder
from .run import _device, finetuned_model


@torch.no_grad()
def transcribe(checkpoint: str, files: list[str], device: str | None = None, decode: dict | None = None, out=print,
               log=print) -> list[str]:  # fmt: skip
    """The transcript of each of ``files`` by the fine-tuned run (its best checkpoint) or checkpoint
    ``checkpoint``; ``out(line)`` gets ``FILE<TAB>WORDS`` per file, ``log`` the summary."""
    dev = _device(device)
    start = time.perf_counter()
    model, _, _, config, state_file, step = finetuned_model(checkpoint)
    if not isinstance(model, SpeechRecognizer):
        raise ValueError(f"{checkpoint} is a {config['task']} run; transcribe takes a speech-recognition run")
    cfg = finetune_config_from_dict({**config, "decode": {**config.get("decode", {}), **(decode or {})}})
    decoder = Decoder(Letters(tuple(config["classes"])), cfg.decode)
    receptive = audio.SAMPLE_RATE // 40  # 25 ms: the CNN's 400-sample receptive field
    model.to(dev)
    texts, seconds, resampled = [], 0.0, 0
    for path in files:
        wave, rate = audio.read_resampled(path)
        if wave.shape[0] < receptive:
            raise ValueError(f"{path} holds {wave.shape[0]} samples at 16 kHz, shorter than the model's 25 ms window")
        resampled += rate != audio.SAMPLE_RATE
        seconds += wave.shape[0] / audio.SAMPLE_RATE
        source = torch.from_numpy(audio.normalize_waveform(wave))[None].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            result = model({"source": source})
        texts.append(decoder(result["logits"].float(), result["lengths"])[0])
        out(f"{path}\t{texts[-1]}")
    note = f", {resampled} resampled to 16 kHz" if resampled else ""
    log(f"transcribe done: {len(files)} file(s), {seconds:.1f} s of audio{note}, in {time.perf_counter() - start:.1f} s "
        f"with step {step} of {state_file} ({decoder.description})")
    log(f"evaluate:   d2v2 evaluate --checkpoint {checkpoint}")
    return texts
