"""The ``d2v2`` command line: one console script, one subcommand per job.

Every subcommand turns bad input into a one-line error and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import platform
import sys

VERSION = "0.1.0"


class UsageError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices and which kernel implementation each op uses."""
    import torch

    from d2v2.kernels import _utils

    print(f"d2v2 {VERSION}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}")
    if _utils.HAS_TRITON:
        import triton

        print(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if _utils.triton_interpret() else ""))
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
        print(f"kernels on {name}: impl='auto' runs {_utils.resolve_impl('auto', t)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v2", description="data2vec 2.0 pretraining on Triton kernels")
    parser.add_argument("--version", action="version", version=f"d2v2 {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and kernel implementations available")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"d2v2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"d2v2 {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
