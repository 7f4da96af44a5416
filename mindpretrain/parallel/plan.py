"""How a run is parallelised, decided once from the device, the worker count and `parallel_config`.

`plan_parallel` and `pipeline_wrapping` are pure, so the decision is tested on any machine:

- one process (no msrun, or one worker): STAND_ALONE;
- CPU with N msrun workers: DATA_PARALLEL over N ranks. The train step all-reduces gradients,
  losses and expert loads itself (CPU supports AllReduce; it lacks ReduceScatter/AlltoAll that
  semi-auto parallel needs), each rank reads its own share of every global batch;
- Ascend: SEMI_AUTO_PARALLEL with `full_batch` (every rank reads the global batch, MindSpore
  slices it), pipeline stages, optimizer sharding and the shard strategies of
  `mindpretrain.parallel.strategies` from `parallel_config`; MindSpore inserts the gradient
  reduction, so the train step must not add its own.

`prepare_model` then applies the plan to a built model (auto-parallel context, shard strategies,
pipeline stages). Nothing here imports MindSpore at module level.
"""
import dataclasses

from mindpretrain.validation import require

STAND_ALONE, DATA_PARALLEL, SEMI_AUTO_PARALLEL = "stand_alone", "data_parallel", "semi_auto_parallel"


@dataclasses.dataclass
class ParallelPlan:
    mode: str
    world_size: int
    data_parallel: int            # ranks the train step averages gradients over itself
    data_rank: int                # this rank's position among them (its data shard)
    full_batch: bool = False      # every rank reads the whole global batch (semi-auto slices it)
    pipeline_stages: int = 1
    optimizer_shard: bool = False
    apply_shard_strategies: bool = False
    # With full_batch each rank reads batch_size x this many samples per step (MindFormers' global batch:
    # batch_size x data_parallel x micro_batch_num under pipeline), which MindSpore then slices.
    batch_size_factor: int = 1
    context: dict = dataclasses.field(default_factory=dict)   # set_auto_parallel_context arguments


def plan_parallel(device_target, use_parallel, world_size, rank, parallel_config=None):
    """How this run is parallelised; `parallel_config` is a mindpretrain.parallel ParallelConfig (or None)."""
    device = str(device_target).upper()
    require(device in ("CPU", "ASCEND", "GPU"), "device_target", device_target, "must be CPU or Ascend")
    if not use_parallel or world_size <= 1:
        require(world_size <= 1, "use_parallel", use_parallel,
                f"must be True when {world_size} workers are launched (msrun); otherwise each would train alone")
        return ParallelPlan(STAND_ALONE, 1, 1, 0, context={"parallel_mode": STAND_ALONE})
    if device != "ASCEND":
        if parallel_config is not None:
            require(parallel_config.model_parallel == 1 and parallel_config.pipeline_stage == 1,
                    "parallel_config", {"model_parallel": parallel_config.model_parallel,
                                        "pipeline_stage": parallel_config.pipeline_stage},
                    f"must be 1 on {device}: only data parallelism runs there (semi-auto parallel, pipeline "
                    "and expert AlltoAll need Ascend)")
        return ParallelPlan(DATA_PARALLEL, world_size, world_size, rank,
                            context={"parallel_mode": DATA_PARALLEL, "gradients_mean": False,
                                     "device_num": world_size})
    return _semi_auto_plan(world_size, parallel_config)


def _semi_auto_plan(world_size, parallel_config):
    require(parallel_config is not None, "parallel_config", None, "must be given for parallel training on Ascend")
    require(parallel_config.device_num == world_size, "parallel_config", parallel_config.to_dict(),
            f"uses data_parallel x model_parallel x pipeline_stage = {parallel_config.device_num} devices, "
            f"but {world_size} workers were launched")
    context = {"parallel_mode": SEMI_AUTO_PARALLEL, "gradients_mean": False, "full_batch": True,
               "device_num": world_size, "pipeline_stages": parallel_config.pipeline_stage,
               "enable_parallel_optimizer": bool(parallel_config.optimizer_shard),
               "enable_alltoall": parallel_config.expert_parallel > 1}
    if parallel_config.parallel_optimizer_context:   # e.g. optimizer_weight_shard_size: 8 (MindFormers' guide)
        context["parallel_optimizer_config"] = dict(parallel_config.parallel_optimizer_context)
    factor = parallel_config.data_parallel * (parallel_config.micro_batch_num if parallel_config.pipeline_stage > 1
                                               else 1)
    return ParallelPlan(SEMI_AUTO_PARALLEL, world_size, 1, 0, full_batch=True, batch_size_factor=factor,
                        pipeline_stages=parallel_config.pipeline_stage,
                        optimizer_shard=bool(parallel_config.optimizer_shard), apply_shard_strategies=True,
                        context=context)


@dataclasses.dataclass(frozen=True)
class PipelineWrapping:
    """How the train step wraps the network for pipeline parallelism (Ascend semi-auto only):
    `mindspore.parallel.nn.Pipeline(network, micro_size=micro_batch_num)` for the forward and
    `mindspore.parallel.nn.PipelineGradReducer(params, opt_shard=optimizer_shard)` on its gradients
    (train_step.PipelineForwardBackwardCell)."""

    stages: int
    micro_batch_num: int
    optimizer_shard: bool = False
    wrapper: str = "mindspore.parallel.nn.Pipeline"
    grad_reducer: str = "mindspore.parallel.nn.PipelineGradReducer"


def pipeline_wrapping(plan, parallel_config=None, accumulation_steps=1):
    """The pipeline wrapping this run needs, or None: only SEMI_AUTO_PARALLEL (Ascend) with
    `pipeline_stage > 1` wraps; stand-alone and CPU data parallel never do."""
    if plan.mode != SEMI_AUTO_PARALLEL or plan.pipeline_stages <= 1:
        return None
    require(parallel_config is not None, "parallel_config", None, "must be given for pipeline parallel training")
    micro = parallel_config.micro_batch_num
    require(isinstance(micro, int) and micro >= plan.pipeline_stages, "parallel_config.micro_batch_num", micro,
            f"must be at least pipeline_stage ({plan.pipeline_stages}): MindSpore's Pipeline cell needs a micro "
            "batch for every stage")
    require(accumulation_steps == 1, "runner_config.gradient_accumulation_steps", accumulation_steps,
            "must be 1 with pipeline_stage > 1: under pipeline parallelism parallel_config.micro_batch_num is "
            "the gradient accumulation")
    return PipelineWrapping(plan.pipeline_stages, micro, bool(plan.optimizer_shard))


def apply_parallel_plan(plan, model=None, parallel_config=None, model_config=None):
    """Set MindSpore's auto-parallel context; under semi-auto parallel also shard the model's primitives
    with the strategies of its model spec's shard table (returns strategies.apply_shard_strategies' report)."""
    import mindspore as ms

    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(**plan.context)
    if plan.apply_shard_strategies and model is not None:
        from mindpretrain.model_spec import spec_for_config
        from mindpretrain.parallel.strategies import apply_shard_strategies

        spec = spec_for_config(model_config)
        if spec.prepare_parallel is not None:
            spec.prepare_parallel(model, parallel_config)
        return apply_shard_strategies(model, parallel_config, spec.shard_table)
    return None


def expert_layout_for(plan, parallel_config, model_config, device_target):
    """The routed experts' split over ranks when this rank holds only its slice (DATA_PARALLEL with
    `expert_parallel > 1`, token exchange by the model's dispatcher), else None: every rank holds every expert
    (stand-alone, where parallel_config does not apply; ep 1), or semi-auto parallel splits them through the
    shard strategies."""
    ep = getattr(parallel_config, "expert_parallel", 1) if parallel_config is not None else 1
    num_experts = getattr(model_config, "n_routed_experts", 0) or 0
    if ep <= 1 or num_experts == 0:
        return None
    if plan.mode != DATA_PARALLEL:        # one process holds every expert; semi-auto: the shard strategies
        return None
    from mindpretrain.parallel.expert_groups import ExpertLayout, check_runtime_support, default_dispatcher

    dispatcher = getattr(model_config, "moe_token_dispatcher_type", None) or default_dispatcher(device_target)
    layout = ExpertLayout(num_experts, ep, plan.data_parallel, plan.data_rank, dispatcher)
    check_runtime_support(layout, device_target)
    return layout


def splits_experts_by_semi_auto(plan, parallel_config, model_config):
    """Semi-auto parallel with `expert_parallel > 1` on a model with routed experts: the stacked experts are split
    by ep (capacity or the dropless exchange, `semi_auto_moe_dispatch`)."""
    ep = getattr(parallel_config, "expert_parallel", 1) if parallel_config is not None else 1
    return plan.mode == SEMI_AUTO_PARALLEL and ep > 1 and bool(getattr(model_config, "n_routed_experts", 0))


def semi_auto_moe_dispatch(plan, parallel_config, model_config):
    """The MoE dispatch a model must be built with. Under semi-auto parallel with `expert_parallel > 1` two
    dispatches split the routed experts by ep: `grouped_matmul`, dropless, tokens exchanged by a per-device
    AlltoAllV (exchanged_experts.py, MindFormers' MoEV3 with `use_gmm: True`; it needs whole experts, expert
    tensor parallel 1), and `capacity` (MindFormers' `use_gmm: False`, dropping past the capacity). Unset, the
    choice follows `use_gmm` (None counts as True), falling back to capacity when experts are split by mp; any
    other explicit choice is refused. Elsewhere the model's own choice (None: its device default)."""
    chosen = getattr(model_config, "moe_dispatch", None)
    if not splits_experts_by_semi_auto(plan, parallel_config, model_config):
        return chosen
    require(chosen in (None, "capacity", "grouped_matmul"), "moe_dispatch", chosen,
            f"does not split the routed experts over parallel_config.expert_parallel "
            f"({parallel_config.expert_parallel}) under semi-auto "
            "parallel: leave it unset or use grouped_matmul or capacity")
    emp = parallel_config.expert_tensor_parallel
    if chosen == "grouped_matmul":
        require(emp == 1, "moe_config.expert_model_parallel", emp,
                "must be 1 with moe_dispatch grouped_matmul under expert parallelism (each device computes "
                "whole experts; use moe_dispatch capacity to split experts over model_parallel)")
    if chosen is None:
        chosen = "grouped_matmul" if getattr(model_config, "use_gmm", None) is not False and emp == 1 \
            else "capacity"
    seq, mp = getattr(model_config, "seq_length", None), parallel_config.model_parallel
    if chosen == "grouped_matmul" and seq is not None:
        require(seq % mp == 0, "seq_length", seq,
                f"must be divisible by parallel_config.model_parallel ({mp}) for the dropless expert exchange, "
                "which splits each data-parallel shard's tokens over model_parallel")
    return chosen


def expert_exchange_for(plan, parallel_config, model_config, rank):
    """This rank's `ExpertExchange` when the model is built with the dropless exchanged dispatch (semi-auto
    parallel, expert_parallel > 1, moe_dispatch grouped_matmul), else None."""
    if not splits_experts_by_semi_auto(plan, parallel_config, model_config) or \
            getattr(model_config, "moe_dispatch", None) != "grouped_matmul":
        return None
    from mindpretrain.parallel.expert_groups import semi_auto_exchange

    return semi_auto_exchange(parallel_config, rank)


def prepare_model(plan, model, model_config, parallel_config, world_size):
    """Apply `plan` to a built model. Under semi-auto parallel the layout is first checked against the model
    (divisibility, experts, pipeline placement) so nothing compiles on a layout that cannot work, and the
    layers get their pipeline stages."""
    if plan.mode != SEMI_AUTO_PARALLEL:
        apply_parallel_plan(plan, model, parallel_config, model_config)
        return
    placement = parallel_config.validate(model_config, world_size)
    apply_parallel_plan(plan, model, parallel_config, model_config)
    if plan.pipeline_stages > 1:
        from mindpretrain.parallel.pipeline import assign_pipeline_stages

        assign_pipeline_stages(model, placement)
