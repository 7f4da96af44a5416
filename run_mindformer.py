"""Entry point with MindFormers' name and flags: train or finetune from one YAML.

    python run_mindformer.py --register_path research/deepseek3 \\
        --config configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml --runner_config.train_steps=20
    bash scripts/msrun_launcher.sh "run_mindformer.py --register_path research/deepseek3 --config ..." 2

Flags not listed below are `--key.sub=value` overrides of the YAML (`--+key=value` adds a key).
Run under msrun, every worker runs this file; communication is initialised from msrun's
environment, and on CPU the workers form one data-parallel group.

This file only parses: `training.launch.setup_run` sets the process up and builds the model, the
Trainer runs, and the exit code says how it ended (0: completed or stopped by SIGTERM with a
checkpoint; 1: a configuration, checkpoint or training error, or the data ran out; 2: bad arguments).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mindpretrain.config import load_config, parse_override_args  # noqa: E402

from mindpretrain.validation import ConfigError  # noqa: E402

RUN_MODES = ("train", "finetune")
PREDICT_REFUSED = ("run_mode predict is not implemented in mindpretrain (run_mindformer.py trains and finetunes); "
                   "tools/logits.py computes logits with a trained checkpoint")


def str_to_bool(value):
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def run_mode(value):
    """argparse type of --run_mode: predict is refused with the way to get logits instead."""
    if value == "predict":
        raise argparse.ArgumentTypeError(PREDICT_REFUSED)
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="run_mindformer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (base_config inheritance allowed)")
    parser.add_argument("--register_path", default=None,
                        help="plugin folder whose @register classes the YAML names (e.g. research/deepseek3)")
    parser.add_argument("--run_mode", type=run_mode, choices=RUN_MODES, default=None,
                        help="default: the YAML's run_mode, else train (predict: use tools/logits.py)")
    parser.add_argument("--use_parallel", type=str_to_bool, default=None,
                        help="distributed run (msrun); default: the YAML's use_parallel, or True under msrun")
    parser.add_argument("--load_checkpoint", default=None,
                        help="weights to start from (native checkpoint dir or Hugging Face dir); with "
                             "--resume_training a checkpoint dir or the folder of checkpoints to resume from")
    parser.add_argument("--resume_training", type=str_to_bool, default=None,
                        help="continue from the newest complete checkpoint (output_dir/checkpoint by default)")
    parser.add_argument("--output_dir", default=None, help="checkpoints, logs, TensorBoard (default: YAML output_dir)")
    parser.add_argument("--device_target", default=None, choices=("CPU", "Ascend", "cpu", "ascend"),
                        help="default: Ascend when CANN is installed, else CPU")
    parser.add_argument("--seed", type=int, default=None, help="default: the YAML's seed, else 0")
    return parser


def resolve_config(argv=None):
    """(args, run_config): the run YAML with the CLI flags folded in, as MindFormers does."""
    from mindpretrain.training.launch import default_device_target, launched_by_msrun

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_override_args(rest)
        run_config = load_config(args.config, overrides)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    workers, _ = launched_by_msrun()
    run_config["run_mode"] = args.run_mode or run_config.get("run_mode") or "train"
    if run_config["run_mode"] == "predict":
        parser.exit(2, f"{parser.prog}: error: {PREDICT_REFUSED}\n")
    if args.use_parallel is not None:
        run_config["use_parallel"] = args.use_parallel
    elif "use_parallel" not in run_config or workers > 1:
        run_config["use_parallel"] = bool(run_config.get("use_parallel")) or workers > 1
    if args.load_checkpoint is not None:
        run_config["load_checkpoint"] = args.load_checkpoint
    if args.resume_training is not None:
        run_config["resume_training"] = args.resume_training
    if args.output_dir is not None:
        run_config["output_dir"] = args.output_dir
    run_config.setdefault("output_dir", "./output")
    if args.seed is not None:
        run_config["seed"] = args.seed
    context = run_config.setdefault("context", {})
    context["device_target"] = (args.device_target or context.get("device_target") or default_device_target())
    context["device_target"] = {"cpu": "CPU", "ascend": "Ascend"}.get(context["device_target"].lower(),
                                                                     context["device_target"])
    run_config["register_path"] = args.register_path
    return args, run_config


def main(argv=None):
    """Parse, set the process up, train; returns the exit code."""
    args, run_config = resolve_config(argv)
    from mindpretrain.training import launch
    from mindpretrain.training.checkpoint import CheckpointError
    from mindpretrain.training.trainer import Trainer, TrainingError

    launch.load_plugins(args.register_path)
    try:
        run = launch.setup_run(run_config)
        trainer = Trainer(run.settings, run.model, run.model_config, run.dp, run.pipeline)
        summary = trainer.train(resume=bool(run_config.get("resume_training")),
                                load_checkpoint=run_config.get("load_checkpoint") or None)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as error:
        print(f"run_mindformer.py: error: {error}", file=sys.stderr)
        return 1
    return 0 if summary["status"] in ("completed", "terminated") else 1


if __name__ == "__main__":
    sys.exit(main())
