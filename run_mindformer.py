"""Entry point with MindFormers' name and flags: train, finetune (or predict) from one YAML.

    python run_mindformer.py --register_path research/deepseek3 \\
        --config configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml --runner_config.train_steps=20
    bash scripts/msrun_launcher.sh "run_mindformer.py --register_path research/deepseek3 --config ..." 2

Flags not listed below are `--key.sub=value` overrides of the YAML (`--+key=value` adds a key).
Run under msrun, every worker runs this file; communication is initialised from msrun's
environment, and on CPU the workers form one data-parallel group.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mindpretrain.config import ConfigError, load_config, parse_override_args  # noqa: E402


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
    parser.add_argument("--run_mode", choices=("train", "finetune", "predict"), default=None,
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
    return parser


def resolve_config(argv=None):
    """(args, config) with CLI flags folded into the config, as MindFormers does."""
    from mindpretrain.training.launch import default_device_target, launched_by_msrun

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_override_args(rest)
        config = load_config(args.config, overrides)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    workers, _ = launched_by_msrun()
    config["run_mode"] = args.run_mode or config.get("run_mode") or "train"
    if args.use_parallel is not None:
        config["use_parallel"] = args.use_parallel
    elif "use_parallel" not in config or workers > 1:
        config["use_parallel"] = bool(config.get("use_parallel")) or workers > 1
    if args.load_checkpoint is not None:
        config["load_checkpoint"] = args.load_checkpoint
    if args.resume_training is not None:
        config["resume_training"] = args.resume_training
    if args.output_dir is not None:
        config["output_dir"] = args.output_dir
    config.setdefault("output_dir", "./output")
    if args.seed is not None:
        config["seed"] = args.seed
    context = config.setdefault("context", {})
    context["device_target"] = (args.device_target or context.get("device_target") or default_device_target())
    context["device_target"] = {"cpu": "CPU", "ascend": "Ascend"}.get(context["device_target"].lower(),
                                                                     context["device_target"])
    config["register_path"] = args.register_path
    return args, config


def main(argv=None):
    args, config = resolve_config(argv)
    import numpy as np

    import mindpretrain.data.loader  # noqa: F401  (registers BlendedMegatronDatasetDataLoader)
    import mindpretrain.training  # noqa: F401  (registers AdamW and the LR schedules)
    from mindpretrain import registry
    from mindpretrain.model_builder import build_model
    from mindpretrain.training import launch
    from mindpretrain.training.checkpoint import CheckpointError
    from mindpretrain.training.trainer import DataParallelInfo, Trainer, TrainingError
    from mindpretrain.utils.logging import get_logger

    logger = get_logger("run")
    if args.register_path:
        registry.import_register_path(args.register_path)
    import mindspore as ms

    device_target = config["context"]["device_target"]
    try:
        launch.init_context(config.get("context"), device_target)
        workers, _ = launch.launched_by_msrun()
        rank, world_size = launch.init_communication(workers if config.get("use_parallel") else 1)
        parallel_config = launch.parallel_config_of(config)
        plan = launch.plan_parallel(device_target, config.get("use_parallel"), world_size, rank, parallel_config)
        seed = int(config.get("seed", 0) or 0)
        ms.set_seed(seed)
        np.random.seed(seed)
        model_config, model = build_model(config, device_target)
        if plan.mode == launch.SEMI_AUTO_PARALLEL:
            # Divisibility, expert and pipeline rules against this model, before any graph is compiled.
            placement = parallel_config.validate(model_config, world_size)
            launch.apply_parallel_plan(plan, model, parallel_config)
            if plan.pipeline_stages > 1:
                from mindpretrain.parallel.pipeline import assign_pipeline_stages

                assign_pipeline_stages(model, placement)
        else:
            launch.apply_parallel_plan(plan, model, parallel_config)
        if plan.batch_size_factor > 1:
            runner = config.setdefault("runner_config", {})
            runner["batch_size"] = runner.get("batch_size", 1) * plan.batch_size_factor
            logger.info("full_batch: every rank reads the global batch of %d samples per micro step",
                        runner["batch_size"])
        logger.info("rank %d/%d on %s, parallel mode %s", rank, world_size, device_target, plan.mode)
        if config["run_mode"] == "predict":
            raise ConfigError("run_mode (predict) is not served by run_mindformer.py in mindpretrain; use "
                              "tools/logits.py for inference with a trained checkpoint")
        output_dir = config["output_dir"]
        pipeline = launch.pipeline_wrapping(plan, parallel_config,
                                            (config.get("runner_config") or {}).get("gradient_accumulation_steps") or 1)
        if pipeline is not None:
            logger.info("pipeline parallel: %d stages, %d micro batches (%s + %s)", pipeline.stages,
                        pipeline.micro_batch_num, pipeline.wrapper, pipeline.grad_reducer)
        trainer = Trainer(config, model, model_config, DataParallelInfo(plan.data_rank, plan.data_parallel, rank),
                          output_dir, pipeline=pipeline)
        summary = trainer.train(resume=bool(config.get("resume_training")),
                                load_checkpoint=config.get("load_checkpoint") or None)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as error:
        print(f"run_mindformer.py: error: {error}", file=sys.stderr)
        return 1
    return 0 if summary["status"] in ("completed", "terminated") else 1


if __name__ == "__main__":
    sys.exit(main())
