"""Turning a resolved run YAML into a running process: device context, communication, seed, model.

`setup_run` is the whole sequence `run_mindformer.py` runs before training, in the order MindSpore
needs it: the run YAML's keys checked against MindFormers' vocabulary (a typo fails before anything
starts), the device context, then communication (msrun), then the parallel plan
(`mindpretrain.parallel.plan`), the seed, the model with the plan applied to it, and last the
typed run settings the trainer takes. Rank 0 then logs one line naming every accepted key that has no
effect here (run-level keys and the model config's `no_effect_keys`). Importing this module imports
neither MindSpore nor the trainer, so the entry script can resolve its arguments without them.
"""
import dataclasses
import os
from typing import Any

from mindpretrain.validation import require
from mindpretrain.utils.logging import get_logger

logger = get_logger("run")


@dataclasses.dataclass
class RunContext:
    """A set-up process: `Trainer(settings, model, model_config, dp, pipeline)` plus how it is parallelised."""

    settings: Any        # trainer.RunSettings
    model: Any
    model_config: Any
    dp: Any              # settings.DataParallelInfo
    pipeline: Any        # plan.PipelineWrapping or None
    plan: Any            # plan.ParallelPlan
    rank: int = 0
    world_size: int = 1


def default_device_target():
    """Ascend when the CANN runtime is installed (its env var or the standard path), else CPU."""
    if os.environ.get("ASCEND_HOME_PATH") or os.path.isdir("/usr/local/Ascend/ascend-toolkit"):
        return "Ascend"
    return "CPU"


def launched_by_msrun():
    """(worker count, rank) from the environment msrun gives its workers, or (1, 0)."""
    workers = int(os.environ.get("MS_WORKER_NUM", "1") or 1)
    return workers, int(os.environ.get("RANK_ID", os.environ.get("MS_NODE_ID", "0")) or 0)


_CONTEXT_KEYS = ("mode", "jit_config", "max_call_depth", "save_graphs", "save_graphs_path", "deterministic",
                 "max_device_memory", "memory_optimize_level", "runtime_num_threads")
_CPU_IGNORED = ("max_device_memory", "memory_optimize_level", "deterministic")


def init_context(context_section, device_target):
    """mindspore.set_context from the YAML `context` section (MindFormers' keys), device from the CLI."""
    import mindspore as ms

    section = dict(context_section or {})
    mode = section.get("mode", 0)
    if isinstance(mode, str):
        mode = {"GRAPH_MODE": 0, "PYNATIVE_MODE": 1}.get(mode.upper(), mode)
    require(mode in (0, 1), "context.mode", mode, "must be 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE)")
    arguments = {"mode": mode}
    for key in _CONTEXT_KEYS[1:]:
        if key in section and not (device_target.upper() == "CPU" and key in _CPU_IGNORED):
            arguments[key] = section[key]
    ms.set_context(**arguments)
    device_id = section.get("device_id")
    if device_target.upper() == "ASCEND" and device_id is not None and os.environ.get("MS_WORKER_NUM") is None:
        ms.set_device(device_target, int(device_id))
    else:
        ms.set_device(device_target)


def init_communication(plan_world_size):
    """mindspore.communication.init() under msrun; returns (rank, world size)."""
    if plan_world_size <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    return get_rank(), get_group_size()


def parallel_config_of(run_config):
    """The run's ParallelConfig (None when the PARALLEL module is unavailable)."""
    try:
        from mindpretrain.parallel.parallel_config import ParallelConfig
    except ImportError:
        return None
    return ParallelConfig.from_run_config(run_config)


def seed_everything(seed):
    """One seed for MindSpore's initialisers and NumPy (the data order has its own seed in the YAML)."""
    import mindspore as ms
    import numpy as np

    ms.set_seed(seed)
    np.random.seed(seed)


def apply_batch_size_factor(run_config, factor):
    """Under `full_batch` every rank reads the global batch: scale `runner_config.batch_size` in the run YAML
    itself, so the settings and the config saved with each checkpoint both show the batch actually read."""
    if factor <= 1:
        return
    runner = run_config.setdefault("runner_config", {})
    runner["batch_size"] = runner.get("batch_size", 1) * factor
    logger.info("full_batch: every rank reads the global batch of %d samples per micro step", runner["batch_size"])


def load_plugins(register_path):
    """Register the core's data loader, optimizer and LR schedules, then the plugin folder's classes."""
    import mindpretrain.data.loader  # noqa: F401  (registers BlendedMegatronDatasetDataLoader)
    import mindpretrain.training  # noqa: F401  (registers AdamW and the LR schedules)
    from mindpretrain import registry

    if register_path:
        registry.import_register_path(register_path)


def log_no_effect_notice(settings, model_config, rank):
    """The one start-up line `no effect here: key1, key2, ...` (rank 0, INFO), or nothing when every key acts."""
    from mindpretrain.mindformers_keys import no_effect_notice

    notice = no_effect_notice(settings.no_effect_keys, model_config)
    if notice and rank == 0:
        logger.info("%s", notice)
    return notice


def _attach_expert_layout(plan, parallel_config, model_config, device_target, rank=0):
    """Experts split over the ranks: under data parallelism the model builds only this rank's slice
    (expert_groups.py); under semi-auto parallel it stores them stacked for the shard strategies to split, and
    the dropless dispatch gets this rank's exchange group (exchanged_experts.py)."""
    from mindpretrain.parallel.plan import expert_exchange_for, expert_layout_for, semi_auto_moe_dispatch, \
        splits_experts_by_semi_auto

    layout = expert_layout_for(plan, parallel_config, model_config, device_target)
    model_config.expert_layout = layout
    dispatch = semi_auto_moe_dispatch(plan, parallel_config, model_config)
    model_config.moe_dispatch = dispatch
    exchange = expert_exchange_for(plan, parallel_config, model_config, rank)
    model_config.expert_exchange = exchange
    if splits_experts_by_semi_auto(plan, parallel_config, model_config):
        # moe_config.use_gmm (and capacity_factor for the capacity dispatch) now act: out of the no-effect notice
        acting = ("use_gmm", "capacity_factor") if dispatch == "capacity" else ("use_gmm",)
        model_config.no_effect_keys = tuple(key for key in getattr(model_config, "no_effect_keys", ())
                                            if not key.endswith(acting))
        logger.info("expert parallel %d under semi-auto parallel: moe_dispatch %s (experts stored and "
                    "computed E/ep per device)", parallel_config.expert_parallel, dispatch)
    if exchange is not None and exchange.group is not None:
        from mindspore.communication import create_group

        create_group(exchange.group, list(exchange.group_ranks))
    if layout is not None and plan.data_rank == 0:
        logger.info("expert parallel: %d experts over %d ranks (%d per rank, %s dispatcher)", layout.num_experts,
                    layout.expert_parallel, layout.experts_per_rank, layout.dispatcher)


def setup_run(run_config):
    """Set up this process for the resolved run YAML (`run_mindformer.resolve_config`) and build its model.

    Raises ConfigError for a configuration that cannot run, before training starts."""
    from mindpretrain.mindformers_keys import check_run_config
    from mindpretrain.model_builder import build_model
    from mindpretrain.parallel import plan as parallel_plan
    from mindpretrain.training.settings import DataParallelInfo, RunSettings

    check_run_config(run_config)
    device_target = run_config["context"]["device_target"]
    init_context(run_config.get("context"), device_target)
    workers, _ = launched_by_msrun()
    rank, world_size = init_communication(workers if run_config.get("use_parallel") else 1)
    parallel_config = parallel_config_of(run_config)
    plan = parallel_plan.plan_parallel(device_target, run_config.get("use_parallel"), world_size, rank,
                                       parallel_config)
    seed_everything(int(run_config.get("seed", 0) or 0))
    model_config, model = build_model(run_config, device_target,
                                      lambda config: _attach_expert_layout(plan, parallel_config, config,
                                                                           device_target, rank))
    parallel_plan.prepare_model(plan, model, model_config, parallel_config, world_size)
    apply_batch_size_factor(run_config, plan.batch_size_factor)
    logger.info("rank %d/%d on %s, parallel mode %s", rank, world_size, device_target, plan.mode)
    settings = RunSettings.from_config(run_config)
    log_no_effect_notice(settings, model_config, rank)
    pipeline = parallel_plan.pipeline_wrapping(plan, parallel_config, settings.accumulation_steps)
    if pipeline is not None:
        logger.info("pipeline parallel: %d stages, %d micro batches (%s + %s)", pipeline.stages,
                    pipeline.micro_batch_num, pipeline.wrapper, pipeline.grad_reducer)
    dp = DataParallelInfo(plan.data_rank, plan.data_parallel, rank)
    return RunContext(settings, model, model_config, dp, pipeline, plan, rank, world_size)
