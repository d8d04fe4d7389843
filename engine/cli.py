"""The ``d2v2`` command line: one console script, one subcommand per job.

Every subcommand turns bad input into a one-line error and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import signal
import sys

VERSION = importlib.metadata.version("d2v2")  # setup.py is the one place the version is written


# Modules of the `engine` and `bench` extras: a lean `pip install d2v2` (kernels and models only) lacks them.
EXTRA_MODULES = {"numpy", "yaml", "tqdm", "PIL", "soundfile", "tokenizers", "safetensors", "sklearn",
                 "espeakng_loader", "jiwer", "matplotlib", "pytest_benchmark"}  # fmt: skip


class UsageError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


try:  # the trainer's own stop signals; imported lazily elsewhere to keep `d2v2 info` light
    from .training.distributed import PeerLost
    from .training.signals import RunStopped
    from .training.unreadable import TrainingStopped
except ImportError:  # pragma: no cover
    TrainingStopped = RunStopped = PeerLost = RuntimeError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_CODE = tuple(os.path.join(_ROOT, part) + os.sep for part in ("kernels", "models", "engine", "bench"))
"""Where d2v2's own modules live (``d2v2.kernels`` ... ``d2v2.bench``)."""


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error d2v2 raised on bad input, or None for anything else (a bug).

    d2v2 reports bad input as ValueError / FileNotFoundError raised by its own code (or its own
    ``UsageError``). The same types raised inside a library (torch, numpy) are bugs of ours or theirs
    and keep their traceback. An error in a DataLoader worker arrives re-raised by torch as "Caught
    ValueError in DataLoader worker process 0" with the worker's traceback as text: its own last line
    is the message, and its last frame says whose code raised it.
    """
    if isinstance(e, UsageError):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not isinstance(e, (ValueError, FileNotFoundError)):
        return None
    text = str(e).strip()
    if text.startswith("Caught ") and "DataLoader worker" in text.splitlines()[0]:
        lines = [line for line in text.splitlines() if line.strip()]
        frames = [line for line in lines if line.lstrip().startswith("File ")]
        if not frames or not any(own in frames[-1] for own in OWN_CODE):
            return None
        last = lines[-1].strip()
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None and not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(OWN_CODE):
        return None
    return text.splitlines()[0] if text else type(e).__name__


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices and which kernel implementation each op uses."""
    import torch

    from d2v2 import kernels

    print(f"d2v2 {VERSION}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}")
    if kernels.HAS_TRITON:
        import triton

        print(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if kernels.triton_interpret() else ""))
    else:
        print("triton not installed: every op runs its PyTorch reference")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    else:
        print("cuda: no GPU visible")
    cpu = torch.empty(0)
    devices = {"cpu": cpu}
    if torch.cuda.is_available():
        devices["cuda"] = torch.empty(0, device="cuda")
    for name, t in devices.items():
        print(f"kernels on {name}: impl='auto' runs {kernels.resolve_impl('auto', t)}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain data2vec 2.0 with a recipe, on --data or the recipe's embedded default data.

    On an existing run folder (--out) it continues that run with its own recipe and settings.
    """
    from .run import pretrain

    overrides = args.set + (["train.compile=true"] if args.compile else [])
    pretrain(
        args.recipe, overrides, data_path=args.data, out=args.out, max_steps=args.max_steps,
        device=args.device, resume=args.resume, init_from=args.init_from,
    )  # fmt: skip
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a pretrained encoder (or a fresh one) with a task head; continue a run in --out."""
    from .finetune.run import finetune

    overrides = args.set + (["train.compile=true"] if args.compile else [])
    finetune(
        args.recipe, args.checkpoint, overrides, data_path=args.data, out=args.out, max_steps=args.max_steps,
        device=args.device, resume=args.resume, weights=args.weights,
    )  # fmt: skip
    return 0


def _decode_options(args: argparse.Namespace) -> dict:
    """The speech recognition decoding options given (``DecodeConfig`` fields)."""
    given = {"beam": args.beam, "lm": args.lm, "lm_weight": args.lm_weight, "word_score": args.word_score}
    return {k: v for k, v in given.items() if v is not None}


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a fine-tuned run's best checkpoint on its validation split (or on --data)."""
    from .finetune.run import evaluate

    evaluate(args.checkpoint, data=args.data, out=args.out, device=args.device, decode=_decode_options(args))
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Print a fine-tuned speech recogniser's transcript of each audio file."""
    from .finetune.transcribe import transcribe

    transcribe(args.checkpoint, args.files, device=args.device, decode=_decode_options(args),
               log=lambda line: print(line, file=sys.stderr))  # fmt: skip
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear probe and kNN on a checkpoint's frozen teacher features."""
    from .probe import probe

    probe(args.checkpoint, data=args.data, out=args.out, device=args.device, test_fraction=args.test_fraction)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint's encoder (safetensors + config.json, HF/timm names where a class matches)."""
    from .export import export

    export(args.checkpoint, args.out, weights=args.weights, fmt=args.format)
    return 0


def cmd_import_fairseq(args: argparse.Namespace) -> int:
    """Import a released fairseq checkpoint (no fairseq needed, no pickled code run)."""
    from .interop import import_fairseq

    import_fairseq(args.checkpoint, args.out, dictionary=args.dict, encoder_only=args.encoder_only)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    """Write a fairseq manifest (train.tsv, valid.tsv) for a folder of audio files."""
    from .data.audio import write_manifest

    train, valid, n = write_manifest(
        args.audio_dir, args.dest or args.audio_dir, args.ext, args.valid_percent, args.seed, warn=_warn
    )
    print(f"{n} files -> {train}" + (f" and {valid}" if valid else ""))
    if args.labels:
        from .data.letters import DICT_FILE, LIBRISPEECH_LETTERS, librispeech_words, write_dictionary, write_labels

        for manifest in (m for m in (train, valid) if m is not None):
            words = librispeech_words(manifest)
            wrd, ltr = write_labels(manifest.parent, manifest.stem, words)
            print(f"{len(words)} transcripts -> {wrd} and {ltr}")
            if manifest == train and not (train.parent / DICT_FILE).exists():
                print(f"letters -> {write_dictionary(train.parent / DICT_FILE, words, order=LIBRISPEECH_LETTERS)}")
        print(f"finetune:   d2v2 finetune --recipe finetune-speech-base-10h --checkpoint RUN --data {train.parent}")
    return 0


def _warn(message: str) -> None:
    print(f"d2v2: warning: {message}", file=sys.stderr)


def plugin_commands() -> dict:
    """Subcommands other packages register under the ``d2v2.commands`` entry-point group (``bench``
    comes from d2v2.bench through setup.py): the engine never imports them itself."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="d2v2.commands")}


def cmd_plugin(args: argparse.Namespace) -> int:
    """Hand the unparsed arguments to a registered subcommand's ``main(argv)``."""
    return args.plugin.load()(args.plugin_args)


def _add_decode_options(p: argparse.ArgumentParser) -> None:
    """Speech recognition's decoding options (``evaluate``, ``transcribe``); the run's ``decode`` otherwise."""
    p.add_argument("--beam", type=int, metavar="N", help="speech recognition: beam search with N hypotheses "
                   "(needs pip install 'd2v2[lm]'); 0 = greedy (the default)")  # fmt: skip
    p.add_argument("--lm", metavar="KENLM", help="speech recognition: a KenLM n-gram model (.arpa / .bin) for the beam search")
    p.add_argument("--lm-weight", type=float, help="the language model's weight (pyctcdecode's alpha, default 0.5)")
    p.add_argument("--word-score", type=float, help="a score added per word (pyctcdecode's beta, default 1.0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v2", description="data2vec 2.0 pretraining on Triton kernels")
    parser.add_argument("--version", action="version", version=f"d2v2 {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices and kernel implementations available")
    p.set_defaults(func=cmd_info)

    from .config import finetune_recipe_names, recipe_names

    p = sub.add_parser("pretrain", help="pretrain data2vec 2.0 with a recipe")
    p.add_argument(
        "--recipe",
        help=f"a recipe name ({', '.join(recipe_names())}) or YAML path; default: the run's own when --out holds "
        "one, else image-tiny",
    )
    p.add_argument("--data", help="data path (default: the recipe's embedded default data)")
    p.add_argument("--out", help="run folder (default: runs/<recipe>-<time>)")
    p.add_argument(
        "--max-steps", type=int, metavar="N",
        help="stop after N optimizer updates in all (resumed ones included); 0 = optim.total_steps, the "
        "schedule's length, which N may not exceed",
    )  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--resume", default="auto",
        help="auto (the newest checkpoint of --out that loads, if any), none (a new run: refused on a folder "
        "with checkpoints), or a checkpoint path",
    )  # fmt: skip
    p.add_argument("--init-from", help="start from another run's weights (a new run: step 0, fresh optimizer)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (same as --set train.compile=true)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. optim.lr=5e-4")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder with a task head (classification, speech recognition)")
    p.add_argument("--recipe", help=f"a fine-tuning recipe ({', '.join(finetune_recipe_names())}) or YAML path; default: "
                   "the run's own when --out holds one")  # fmt: skip
    p.add_argument("--checkpoint", help="the pretraining run (folder, checkpoint folder or state.pt) to start from, "
                   "or none for a fresh encoder (the no-pretraining baseline)")  # fmt: skip
    p.add_argument("--weights", choices=("student", "teacher"), help="which weights to start from (default: student, "
                   "what the reference fine-tunes)")  # fmt: skip
    p.add_argument("--data", help="labelled data (default: the embedded digits, spoken keywords, pydoc topics or "
                   "synthetic speech with its transcripts)")  # fmt: skip
    p.add_argument("--out", help="run folder (default: runs/<recipe>-<time>)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer updates in all")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--resume", default="auto", help="auto, none, or a checkpoint path (as for pretrain)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. optim.lr=5e-4")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score a fine-tuned run on its validation split (or --data)")
    p.add_argument("--checkpoint", required=True, help="a fine-tuning run folder (its best checkpoint), checkpoint folder or state.pt")
    p.add_argument("--data", help="labelled data in the task's layout to score instead of the run's validation split")
    p.add_argument("--out", help="where to write the JSON result (default: <run>/eval/)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    _add_decode_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("transcribe", help="a fine-tuned speech recogniser's transcript of audio files, one line each")
    p.add_argument("--checkpoint", required=True, help="a speech-recognition fine-tuning run (its best checkpoint), "
                   "checkpoint folder or state.pt")  # fmt: skip
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg), read whole as mono at 16 kHz: "
                   "channels are averaged and other sample rates resampled")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"))
    _add_decode_options(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("probe", help="linear probe and kNN of a checkpoint on a labelled set")
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoint folder or state.pt")
    p.add_argument("--data", help="a folder with one subfolder per class (default: the embedded digits, voices, or pydoc topics)")
    p.add_argument("--out", help="where to write the JSON result (default: <run>/probe/step-XXXXXXXX.json)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("export", help="a checkpoint's encoder as safetensors + config.json (HF / timm where they match)")
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoint folder or state.pt")
    p.add_argument("--out", required=True, help="a new folder for model.safetensors, config.json (and the tokenizer)")
    p.add_argument(
        "--weights", help="teacher (default where the method has an EMA teacher: data2vec2, data2vec) or student",
    )  # fmt: skip
    p.add_argument(
        "--format", default="auto",
        help="auto (the matching Hugging Face / timm class, else d2v2's own format) or d2v2 (always d2v2's own)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-fairseq", help="a fairseq data2vec 2.0, wav2vec 2.0 or data2vec 1.0 checkpoint "
                       "(pretrained or fine-tuned) as a d2v2 run folder")  # fmt: skip
    p.add_argument("checkpoint", help="the fairseq .pt file (data2vec 2.0 pretrained or fine-tuned, wav2vec 2.0 / data2vec "
                   "1.0 audio pretrained; a CTC fine-tune of any of them becomes a speech-recognition run)")  # fmt: skip
    p.add_argument("--out", required=True, help="the new run folder (must not exist, or be empty)")
    p.add_argument("--dict", help="a CTC fine-tune's letter dictionary, the dict.ltr.txt it was fine-tuned with "
                   "(default: LibriSpeech's)")  # fmt: skip
    p.add_argument("--encoder-only", action="store_true", help="a CTC fine-tune as a pretraining run of its encoder, "
                   "the head dropped (to fine-tune it again)")  # fmt: skip
    p.set_defaults(func=cmd_import_fairseq)

    p = sub.add_parser("manifest", help="write a fairseq audio manifest (train.tsv) for a folder")
    p.add_argument("audio_dir", help="folder searched recursively for audio files")
    p.add_argument("--dest", help="where train.tsv / valid.tsv go (default: the audio folder)")
    p.add_argument("--ext", default="wav,flac", help="comma-separated extensions (default: wav,flac)")
    p.add_argument("--valid-percent", type=float, default=0.0, help="fraction of files for valid.tsv")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--labels", action="store_true", help="also write <split>.wrd / <split>.ltr transcripts (and "
                   "dict.ltr.txt) from LibriSpeech's SPEAKER/CHAPTER/*.trans.txt, for speech recognition")  # fmt: skip
    p.set_defaults(func=cmd_manifest)

    # Everything after a registered subcommand (--help included) goes to it unparsed.
    for name, entry in sorted(plugin_commands().items()):
        p = sub.add_parser(name, help=f"{name} (see `d2v2 {name} --help`)", add_help=False, prefix_chars="\0")
        p.add_argument("plugin_args", nargs="*")
        p.set_defaults(func=cmd_plugin, plugin=entry)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun every rank fails alike; rank 0 alone says why.
    speak = os.environ.get("RANK", "0") == "0"
    try:
        return args.func(args)
    except RunStopped as e:
        if speak:
            print(f"d2v2 {args.command}: stopped on {e}", file=sys.stderr)
        return e.exit_code
    except PeerLost as e:  # every rank: the dead one may be rank 0
        print(f"d2v2 {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        if speak:
            print(f"d2v2 {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"d2v2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name not in EXTRA_MODULES:
            raise
        if speak:
            print(f"d2v2 {args.command}: error: the {e.name} package is missing; install the command line's "
                  "packages with: pip install 'd2v2[engine]' (or '[bench]' for benchmarks)", file=sys.stderr)
        return 2
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise  # a bug: keep its traceback
        if speak:
            print(f"d2v2 {args.command}: error: {message}", file=sys.stderr)
        return 2


def console_main() -> None:
    code = main()
    # The command has ended and said how: a late signal (the second of two Ctrl-C) must not make the
    # interpreter's exit a death by that signal instead of this exit code.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
