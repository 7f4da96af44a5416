"""Entry point with MindFormers' name and flags: train or finetune from one YAML, or generate text (predict).

    python run_mindformer.py --register_path research/deepseek3 \\
        --config configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml --runner_config.train_steps=20
    bash scripts/msrun_launcher.sh "run_mindformer.py --register_path research/deepseek3 --config ..." 2
    python run_mindformer.py --register_path research/deepseek3 --config <yaml> --run_mode predict \\
        --load_checkpoint DIR --predict_data "a prompt" "another"      (see mindpretrain/generation/predict.py)

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

from mindpretrain.checkpoint.conversion import MTP_CHOICES  # noqa: E402
from mindpretrain.config import load_config, parse_override_args  # noqa: E402
from mindpretrain.validation import ConfigError  # noqa: E402

RUN_MODES = ("train", "finetune", "predict", "grpo")


def str_to_bool(value):
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser():
    parser = argparse.ArgumentParser(prog="run_mindformer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (base_config inheritance allowed)")
    parser.add_argument("--register_path", default=None,
                        help="plugin folder whose @register classes the YAML names (e.g. research/deepseek3)")
    parser.add_argument("--run_mode", choices=RUN_MODES, default=None,
                        help="default: the YAML's run_mode, else train")
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
    parser.add_argument("--mtp", choices=MTP_CHOICES, default=None,
                        help="--load_checkpoint weights without MTP layers (saved by transformers): init (default: "
                             "the MTP module starts fresh), drop (only for a YAML model without MTP), require (refuse)")
    predict = parser.add_argument_group("run_mode predict")
    predict.add_argument("--predict_data", nargs="+", default=None,
                         help="prompts, or one .txt (a prompt per line) / .jsonl ({\"prompt\": ...} per line) file")
    predict.add_argument("--predict_batch_size", type=int, default=None,
                         help="prompts decoded together (default: the YAML's predict_batch_size, else 8)")
    predict.add_argument("--tokenizer", default=None,
                         help="tokenizer.json or SentencePiece .model (default: the YAML's processor.tokenizer "
                              "tokenizer_file / vocab_file, else the checkpoint's tokenizer.json)")
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
    if run_config["run_mode"] not in RUN_MODES:
        parser.exit(2, f"{parser.prog}: error: run_mode ({run_config['run_mode']!r}) must be one of "
                       f"{', '.join(RUN_MODES)}\n")
    if run_config["run_mode"] != "predict" and (args.predict_data or args.predict_batch_size):
        parser.exit(2, f"{parser.prog}: error: --predict_data and --predict_batch_size need --run_mode predict\n")
    if run_config["run_mode"] not in ("predict", "grpo") and args.tokenizer:
        parser.exit(2, f"{parser.prog}: error: --tokenizer needs --run_mode predict or grpo\n")
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
    if args.mtp is not None:
        run_config["load_checkpoint_mtp"] = args.mtp
    context = run_config.setdefault("context", {})
    context["device_target"] = (args.device_target or context.get("device_target") or default_device_target())
    context["device_target"] = {"cpu": "CPU", "ascend": "Ascend"}.get(context["device_target"].lower(),
                                                                     context["device_target"])
    run_config["register_path"] = args.register_path
    return args, run_config


def main(argv=None):
    """Parse, set the process up, train; returns the exit code.

    A user's mistake (a bad path, a missing dataset, a refused config, a checkpoint of another shape)
    ends the run with one line `run_mindformer.py: error: ...` and exit code 1, so a worker log shows
    the cause and not a traceback; any other exception is a bug and keeps its traceback.
    MINDPRETRAIN_TRACEBACK=1 shows the traceback of user errors too.
    """
    quiet_mindspore_logs(os.environ)
    try:
        return run(argv)
    except Exception as error:  # noqa: BLE001  (classified below; anything else is re-raised untouched)
        line = error_line(error, os.environ)
        if line is None or os.environ.get("MINDPRETRAIN_TRACEBACK", "0") not in ("", "0"):
            raise
        print(line, file=sys.stderr, flush=True)
        return 1


def run(argv):
    """Resolve the YAML and flags, then train (train, finetune) or generate (predict)."""
    args, run_config = resolve_config(argv)
    if run_config["run_mode"] == "predict":
        return run_prediction(args, run_config)
    if run_config["run_mode"] == "grpo":
        return run_reinforcement(args, run_config)
    return run_training(args, run_config)


def run_prediction(args, run_config):
    """One process, one device: load the plugins, set the MindSpore context from the YAML, generate."""
    from mindpretrain.generation.predict import run_predict
    from mindpretrain.training import launch

    workers, _ = launch.launched_by_msrun()
    if workers > 1:
        raise ConfigError(f"run_mode predict runs on one device; it was started as {workers} msrun workers")
    launch.load_plugins(args.register_path)
    launch.init_context(run_config.get("context"), run_config["context"]["device_target"])
    launch.seed_everything(int(run_config.get("seed", 0) or 0))
    run_predict(run_config, args.predict_data, args.predict_batch_size, args.tokenizer)
    return 0


def run_reinforcement(args, run_config):
    """GRPO (mindpretrain/rl): the rl_config section and the prompts are checked before the model is built."""
    from mindpretrain.rl.launch import run_grpo
    from mindpretrain.training import launch

    launch.load_plugins(args.register_path)
    summary = run_grpo(run_config, args.tokenizer)
    return 0 if summary["status"] in ("completed", "terminated") else 1


def run_training(args, run_config):
    """Load the plugins, set the process up and train."""
    from mindpretrain.training import launch
    from mindpretrain.training.trainer import Trainer

    launch.load_plugins(args.register_path)
    run = launch.setup_run(run_config)
    trainer = Trainer(run.settings, run.model, run.model_config, run.dp, run.pipeline)
    summary = trainer.train(resume=bool(run_config.get("resume_training")),
                            load_checkpoint=run_config.get("load_checkpoint") or None)
    return 0 if summary["status"] in ("completed", "terminated") else 1


# MindSpore's C++ log level (0 debug, 1 info, 2 warning, 3 error), read once when MindSpore is imported;
# its Python logger follows the same variable.
MINDSPORE_LOG_LEVEL = ("GLOG_v", "3")

# (module, class) of the errors that mean "the input is wrong", not "the code is wrong". Looked up in
# sys.modules: an error can only be of a class whose module was imported, and a failed import stays a bug.
USER_ERRORS = (
    ("mindpretrain.validation", "ConfigError"),
    ("mindpretrain.registry", "RegistryError"),
    ("mindpretrain.training.checkpoint", "CheckpointError"),
    ("mindpretrain.training.trainer", "TrainingError"),
    ("mindpretrain.data.indexed_dataset", "IndexedDatasetError"),
    ("mindpretrain.data.tokenizer", "TokenizerError"),
    ("mindpretrain.model_spec", "WeightsMismatchError"),
    ("mindpretrain.checkpoint.safetensors_io", "SafetensorsError"),
    ("mindpretrain.checkpoint.conversion_plan", "ConversionError"),
    ("mindpretrain.rl.rewards", "RewardError"),
    ("yaml", "YAMLError"),
)
# A path that is not there or not usable is the user's to fix (a full disk or a dead socket is not).
USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def quiet_mindspore_logs(environ):
    """Errors only from MindSpore's C++ logs unless the user chose a level: its [WARNING] lines
    (cluster building, communication groups) would otherwise bury the run's own log lines."""
    name, level = MINDSPORE_LOG_LEVEL
    environ.setdefault(name, level)


def is_user_error(error):
    if isinstance(error, USER_OS_ERRORS):
        return True
    classes = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS)
    return any(isinstance(error, cls) for cls in classes if isinstance(cls, type))


def error_line(error, environ):
    """The one line a user error ends the run with, or None for a bug (which keeps its traceback).

    msrun's scheduler runs this script too, and its `init()` fails only because workers did: its
    message's first line (not MindSpore's C++ call stack) says which ones."""
    if is_user_error(error):
        message = describe(error)
    elif environ.get("MS_ROLE") == "MS_SCHED" and isinstance(error, RuntimeError):
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        message = f"msrun scheduler: {first}"
    else:
        return None
    return f"run_mindformer.py: error: {message}"


def describe(error):
    """The error's message on one line (an OSError as 'reason: path')."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    parts = (" ".join(raw.split()) for raw in (str(error) or type(error).__name__).splitlines())
    line = ""
    for part in filter(None, parts):  # a list of problems becomes "intro: first; second"
        separator = "" if not line else " " if line.endswith(":") else "; "
        line += separator + part
    return line


if __name__ == "__main__":
    sys.exit(main())
