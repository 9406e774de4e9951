"""`posttrain <command> [--config file.yaml] [section.key=value ...]`"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from posttrain.config import (
    ConfigError,
    DPORunConfig,
    EvalRunConfig,
    GRPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    load_config,
)
from posttrain.data.sources import DataError

# command -> (help, run config class, "module:function" of its loop, an override example)
TRAINING_COMMANDS = {
    "sft": ("supervised fine-tuning", SFTRunConfig, "posttrain.loops.sft:run_sft", "sft.max_num_steps=10"),
    "dpo": ("direct preference optimisation on chosen/rejected pairs", DPORunConfig, "posttrain.loops.dpo:run_dpo",
            "dpo.reference_policy_kl_penalty=0.1"),
    "rm": ("train a Bradley-Terry reward model on chosen/rejected pairs", RMRunConfig, "posttrain.loops.rm:run_rm",
           "rm.max_num_steps=50"),
    "grpo": ("GRPO reinforcement learning with verifiable rewards, on Ray", GRPORunConfig,
             "posttrain.loops.grpo:run_grpo", "grpo.num_generations_per_prompt=8"),
}


def _train(args: argparse.Namespace) -> None:
    """The loop is imported on use: `posttrain --help` should not wait for torch."""
    import importlib

    _, config_class, loop, _ = TRAINING_COMMANDS[args.command]
    module, _, function = loop.partition(":")
    overrides = list(args.overrides) + (["checkpointing.resume=required"] if args.resume else [])
    run_cfg = load_config(config_class, args.config, overrides)
    getattr(importlib.import_module(module), function)(run_cfg)


def _eval(args: argparse.Namespace) -> None:
    from posttrain.loops.eval import run_eval

    run_eval(load_config(EvalRunConfig, args.config, args.overrides))


def _convert(args: argparse.Namespace) -> None:
    from posttrain.train.convert import checkpoint_to_hf

    print(f"wrote Hugging Face model + tokenizer to {checkpoint_to_hf(args.checkpoint, args.out, overwrite=args.overwrite)}")

def _demo(args: argparse.Namespace) -> None:
    from posttrain.demo.run import run_demo

    run_demo(args.workdir, args.overrides, with_grpo=not args.sft_only)


def _plot(args: argparse.Namespace) -> None:
    from posttrain.logging import plot_metrics

    paths = plot_metrics(args.log_dir, args.out)
    print(f"wrote {len(paths)} plots to {paths[0].parent}" if paths else f"no metrics to plot in {args.log_dir}")


def _tiny_model(args: argparse.Namespace) -> None:
    from posttrain.demo.tiny_model import save_tiny_model

    print(f"saved tiny {args.arch} model ({args.size}) to {save_tiny_model(args.out, args.size, args.arch)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, (help_text, _, _, example) in TRAINING_COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", help="YAML config file")
        command.add_argument("--resume", action="store_true", help="require resuming from the latest checkpoint "
                                                                   "(by default a checkpoint is resumed if found)")
        command.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
        command.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="pass@k / maj@k of a model on a math benchmark (MATH-500, AIME 2024, GSM8K)")
    ev.add_argument("--config", help="YAML config file")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generation.model_name=results/sft/final_model")
    ev.set_defaults(func=_eval)

    convert = sub.add_parser("convert", help="export a training checkpoint as a Hugging Face model folder")
    convert.add_argument("checkpoint", help="a step_N checkpoint, or a checkpoint_dir (its latest checkpoint)")
    convert.add_argument("out", help="output folder (model + tokenizer, loadable by from_pretrained)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    convert.set_defaults(func=_convert)

    demo = sub.add_parser("demo", help="train a tiny local model on arithmetic and show it learning")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("overrides", nargs="*",
                      help="dotted overrides: sft:key=value for the SFT stage, grpo:key=value for GRPO, "
                           "key=value for both")
    demo.add_argument("--sft-only", action="store_true", help="stop after the SFT stage")
    demo.set_defaults(func=_demo)

    plot = sub.add_parser("plot", help="write PNG curves of a run's metrics.jsonl")
    plot.add_argument("log_dir")
    plot.add_argument("--out", help="output folder (default: <log_dir>/plots)")
    plot.set_defaults(func=_plot)

    tiny = sub.add_parser("tiny-model", help="build the tiny local tokenizer + model (no network)")
    tiny.add_argument("out")
    tiny.add_argument("--size", default="test", choices=["test", "demo", "small", "0.5b"])
    tiny.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    tiny.set_defaults(func=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError, OSError, FloatingPointError) as err:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
