"""`posttrain <command> [--config file.yaml] [section.key=value ...]`"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import sys
import time
import traceback
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.markup import escape

from posttrain.config import (
    ConfigError,
    DPORunConfig,
    EnvConfig,
    EvalRunConfig,
    GRPORunConfig,
    RMRunConfig,
    SFTRunConfig,
    load_config,
)
from posttrain.data.sources import DataError
from posttrain.envs.base import InvalidRolloutsError

T = TypeVar("T")

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
    run_cfg = _load(config_class, args.config, overrides)
    args.log_dir = run_cfg.logger.log_dir  # where main() writes the traceback of a run that fails
    getattr(importlib.import_module(module), function)(run_cfg)


def _eval(args: argparse.Namespace) -> None:
    run_cfg = _load(EvalRunConfig, args.config, args.overrides)
    from posttrain.loops.eval import run_eval

    run_eval(run_cfg)


def _load(config_class: type[T], path: str | None, overrides: list[str]) -> T:
    """The run config, and the import paths its env names resolved (the loop checks them too): here,
    before the loop's imports (torch, Ray: seconds), a typo in one fails at once."""
    run_cfg = load_config(config_class, path, overrides)
    if isinstance(getattr(run_cfg, "env", None), EnvConfig):
        from posttrain.envs.registry import check_env_config

        check_env_config(run_cfg.env)
    return run_cfg


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


# The example configs, shipped in the package so that an installed wheel (no clone) has them too.
BUILTIN_CONFIGS = importlib.resources.files("posttrain") / "examples" / "configs"


def _builtin_configs() -> dict[str, Traversable]:
    """Built-in config name (`sft_tiny`) -> its file."""
    return {f.name.removesuffix(".yaml"): f for f in sorted(BUILTIN_CONFIGS.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def _config_file(value: str) -> str:
    """`--config`: a YAML file, or a built-in config's name (no .yaml suffix, no folder)."""
    path = Path(value)
    if path.suffix in (".yaml", ".yml") or path.name != value or path.exists():
        return value
    builtin = _builtin_configs()
    if value not in builtin:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a config file nor a built-in config; the built-in "
                                         f"ones are {', '.join(builtin)} (`posttrain examples` copies them)")
    return str(builtin[value])


def _examples(args: argparse.Namespace) -> None:
    """Copy the built-in configs into DIR/configs, so that the README's examples/configs/... paths
    work from DIR's parent, and list them. A copy that was edited is not replaced without --overwrite."""
    out = Path(args.dir) / "configs"
    configs = {f"{name}.yaml": file.read_text(encoding="utf-8") for name, file in _builtin_configs().items()}
    edited = [out / name for name, text in configs.items()
              if (out / name).is_file() and (out / name).read_text(encoding="utf-8") != text]
    if edited and not args.overwrite:
        raise FileExistsError(f"these differ from the built-in configs and would be replaced: "
                              f"{', '.join(map(str, edited))}; pass --overwrite to replace them, or give another folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in configs.items():
        if not (out / name).is_file() or out / name in edited:
            (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}  {text.splitlines()[0].lstrip('# ')}")
    print(f"run one with e.g. `posttrain sft --config {out / 'sft_tiny.yaml'}`, or by name: `--config sft_tiny`")


CONFIG_HELP = "YAML config file, or a built-in config's name (e.g. sft_tiny; `posttrain examples` lists them)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, (help_text, _, _, example) in TRAINING_COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", type=_config_file, help=CONFIG_HELP)
        command.add_argument("--resume", action="store_true", help="require resuming from the latest checkpoint "
                                                                   "(by default a checkpoint is resumed if found)")
        command.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
        command.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="pass@k / maj@k of a model on a math benchmark (MATH-500, AIME 2024, GSM8K)")
    ev.add_argument("--config", type=_config_file, help=CONFIG_HELP)
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

    examples = sub.add_parser("examples", help="copy the example configs into DIR/configs and list them")
    examples.add_argument("dir", nargs="?", default="examples", help="default: ./examples")
    examples.add_argument("--overwrite", action="store_true", help="replace copies that were edited")
    examples.set_defaults(func=_examples)
    return parser


_RAY_WORKER = re.compile(r"ray::([\w.]+)\(")  # how Ray names the actor method in a remote traceback


def ray_error_message(err: BaseException) -> str | None:
    """One line for an error raised inside a Ray actor: the original exception's type and message,
    and the method it came from; None for any other error. Ray is not imported for this (it is
    slow to import): an error can come from Ray only once something else has imported it."""
    exceptions = sys.modules.get("ray.exceptions")
    if exceptions is None or not isinstance(err, exceptions.RayTaskError | exceptions.RayActorError):
        return None
    text = str(err)
    cause = getattr(err, "cause", None)  # RayTaskError: the exception the actor raised
    if cause is None or isinstance(cause, exceptions.RayError):  # a dead actor, or a cause Ray could not ship
        cause_text = text.strip().splitlines()[-1].strip()  # the traceback's last line: "Type: message"
    else:
        cause_text = f"{type(cause).__name__}: {cause}"
    worker = _RAY_WORKER.search(text)
    return f"{cause_text} (raised in {f'the Ray worker {worker.group(1)}' if worker else 'a Ray worker'})"


def _log_traceback(err: BaseException, log_dir: str, argv: list[str]) -> Path:
    """Append the full traceback to <logger.log_dir>/error.log."""
    path = Path(log_dir) / "error.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} posttrain {' '.join(argv)}\n")
        f.write("".join(traceback.format_exception(err)))
    return path


def main(argv: list[str] | None = None) -> int:
    """Errors a user can fix end with one message and exit code 2; `--debug` adds the traceback."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        args.func(args)
    except Exception as err:
        # Ray first: an actor's error is also an instance of the original class (a ConfigError, an OSError)
        message = ray_error_message(err)
        cluster = sys.modules.get("posttrain.cluster.ray_cluster")  # loaded if a worker group ran
        died = cluster is not None and isinstance(err, cluster.WorkerDiedError)
        if message is None and not died and not isinstance(
                err, ConfigError | DataError | InvalidRolloutsError | OSError | FloatingPointError):
            raise
        if args.debug:
            traceback.print_exception(err)
        if message is not None:
            log_dir = getattr(args, "log_dir", None)  # set by the training commands
            message += (f"; full traceback in {_log_traceback(err, log_dir, argv)}" if log_dir
                        else "; run with posttrain --debug for the full traceback")
        console.print(f"[bold red]error:[/] {escape(message or str(err))}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
