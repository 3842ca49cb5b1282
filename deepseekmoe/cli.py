"""The `deepseekmoe` command line.

Each subcommand lives with its concern and is imported only when chosen, so `deepseekmoe --help`
stays fast. A command module provides `add_arguments(parser)` and `run(args) -> int | None`.
Errors a user can cause (`UserError`) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deepseekmoe.errors import UserError

# name -> (module, help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("deepseekmoe.model.info", "parameter / FLOP accounting and layer plan of a preset or config"),
    "prepare": ("deepseekmoe.data.cli", "tokenize text/jsonl/parquet into token shards for training"),
    "tokenizer": ("deepseekmoe.data.tokenizer_cli", "train a byte-level BPE or inspect a tokenizer.json"),
    "train": ("deepseekmoe.train.cli", "pretrain a model from a TOML recipe (default: the tiny CPU job)"),
    "sft": ("deepseekmoe.train.sft", "fine-tune a model on chat / instruction records, in full or with LoRA"),
    "generate": ("deepseekmoe.inference.cli", "complete prompts with a checkpoint (KV cache, sampling, streaming)"),
    "chat": ("deepseekmoe.inference.chat", "chat in the terminal with a chat checkpoint (16b-chat template)"),
    "convert": ("deepseekmoe.checkpoint.convert",
                "convert between native training checkpoints and the released HF format"),
    "eval": ("deepseekmoe.eval.cli", "perplexity / bits-per-byte and the paper's benchmarks from local files"),
    "analyze": ("deepseekmoe.analysis.cli", "routing statistics and the paper's expert-specialisation experiments"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every command's help: the epilog as written (examples), and "(default: X)" after an option's
    help only when X says something (not None, False or []) and the help does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseekmoe",
        description="DeepSeekMoE in PyTorch: train, evaluate, convert and serve MoE language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    return parser


def _version() -> str:
    from deepseekmoe import __version__

    return f"deepseekmoe {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Parse the command name first, then let the command module add its own arguments.
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        module = importlib.import_module(COMMANDS[name][0])
        sub = argparse.ArgumentParser(prog=f"deepseekmoe {name}", description=COMMANDS[name][1],
                                      formatter_class=HelpFormatter)
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        args.command = name
        try:
            rc = module.run(args)
        except UserError as e:
            print(f"deepseekmoe {name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"deepseekmoe {name}: interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)
    # No command name: --help and --version exit inside parse_args, an unknown name is an error there.
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
