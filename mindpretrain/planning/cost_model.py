"""Memory, FLOPs and communication of one training step, per device: the planner's and the trainer's model.

Why arithmetic and not a dry run: the 1024-card layout of the 671B model has to be checked on a laptop, before
anyone books the cluster, and a layout that does not fit is only found after most of an hour of compilation
on Ascend. So everything here is computed from the model config, the parallel layout and the model's
`ModelSpec` (`mindpretrain.model_spec`): its parameter table and shard table give the weights, its planning
hooks say which activations its own kernels keep and what a token costs in FLOPs. This module does the
generic part (pipeline stages, optimizer sharding, dtype bytes, recompute, communication) and builds the
`Plan` that `tools/plan.py` prints. What is modelled, the formulas and how the kernel constants are re-fitted:
docs/planner.md.
"""
import dataclasses
from typing import Dict, List, Optional

from mindpretrain.validation import require
from mindpretrain.model_spec import spec_for_config
from mindpretrain.parallel.layouts import weight_layouts
from mindpretrain.parallel.pipeline import place_layers

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 1024 ** 3

# Device peak dense throughput used for MFU. CONFIGURED ASSUMPTION, not a measurement:
# Atlas 800T A2 carries Ascend 910B NPUs; 320 TFLOPS FP16/BF16 per NPU is the figure quoted in
# "昇腾910B深度解析：达芬奇架构如何实现320TFLOPS算力突破" (borimooc.com, 2025-02-25). Other public
# figures range from 256 TFLOPS (the original Ascend 910, Hot Chips 2019) to 376 TFLOPS (910B2 variants);
# override with `--peak-tflops` or `device_peak_flops(..., override)` for your exact SKU.
DEVICE_PEAK_FLOPS = {
    "atlas-800t-a2": 320e12,
    "ascend-910b": 320e12,
    "cpu": None,
}
DEFAULT_DEVICE = "atlas-800t-a2"
PARALLEL_OPTIMIZER_THRESHOLD_KB = 64

# A CPU run's process beyond its tensors (TrainingSetup.host_runtime): MindSpore's runtime, the compiled graph and
# what its CPU memory pool holds beyond the activations counted here. With the optimizer step on the host
# (training/host_adamw.py) it no longer grows with the parameters: measured 421-1329 MiB over the planned tensors
# at four sizes (tiny YAML, the benchmark model, a 1.46 GiB probe, the 1B YAML); this constant keeps all four
# within 5% (docs/planner.md has the table and the commands).
CPU_RUNTIME_BYTES = 600 * 2 ** 20


def device_peak_flops(device=DEFAULT_DEVICE, override_tflops=None):
    if override_tflops:
        return float(override_tflops) * 1e12
    return DEVICE_PEAK_FLOPS.get(device)


def planning_hooks(spec):
    """The spec's planner hooks; ConfigError when its plugin provides none (the model cannot be planned)."""
    require(spec.planning is not None, "model.model_config.type", spec.config_class.__name__,
            f"must have planner hooks in its model spec ({spec.name!r} has none), so this model cannot be planned")
    return spec.planning


# ------------------------------------------------------------------------------------------- activations
def _layer_is_moe(model_config, layer):
    if hasattr(model_config, "is_moe_layer"):
        return model_config.is_moe_layer(layer)
    return layer >= model_config.first_k_dense_replace


def _dtype_bytes(model_config, key):
    return {"compute": DTYPE_BYTES[model_config.compute_dtype],
            "norm": DTYPE_BYTES[model_config.layernorm_compute_type],
            "softmax": DTYPE_BYTES[model_config.softmax_compute_type],
            "fp32": 4, "int32": 4}[key]


def terms_bytes(model_config, terms, dropped=()):
    """Bytes of (name, elements, dtype key) terms, leaving out the names in `dropped`."""
    total = 0.0
    for name, elements, key in terms:
        if name in dropped:
            continue
        total += elements * _dtype_bytes(model_config, key)
    return total


def layer_activation_bytes_per_token(model_config, parallel_config, hooks, layer, seq_length, fused_kernels,
                                     mode="none", tokens=None):
    """Bytes one layer keeps per token (per device) under recompute `mode` (none|selective|full)."""
    if mode == "full":
        return model_config.hidden_size / parallel_config.sequence_parallel * DTYPE_BYTES[model_config.compute_dtype]
    terms = hooks.layer_activation_terms(model_config, parallel_config, layer, seq_length, fused_kernels, tokens)
    dropped = hooks.selective_recompute_drops if mode == "selective" else ()
    return terms_bytes(model_config, terms, dropped)


def embedding_activation_bytes_per_token(model_config, parallel_config):
    return model_config.hidden_size / parallel_config.sequence_parallel * DTYPE_BYTES[model_config.compute_dtype]


# ------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class StageMemory:
    stage: int
    layers: int
    weights: float
    gradients: float
    optimizer: float
    gathered_weights: float
    activations: float
    activations_without_recompute: float
    in_flight_micro_batches: int
    runtime: float = 0.0         # a CPU run's process and memory-pool overhead (CPU_RUNTIME_BYTES)

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.gathered_weights + self.activations + \
            self.runtime

    @property
    def total_without_recompute(self):
        return self.weights + self.gradients + self.optimizer + self.gathered_weights + \
            self.activations_without_recompute + self.runtime


@dataclasses.dataclass
class TrainingSetup:
    """What besides model and layout decides the cost of a step (read from the run YAML by `from_run_config`)."""

    micro_batch_size: int = 1
    seq_length: Optional[int] = None
    fused_kernels: bool = True               # Ascend: flash attention etc.; False: this repo's ops (CPU)
    recompute: Optional[tuple] = None        # per-layer modes (main + MTP); None: the model config's
    gradient_accumulation_shard: bool = False
    parallel_optimizer_threshold_kb: float = PARALLEL_OPTIMIZER_THRESHOLD_KB
    host_runtime: bool = False               # a CPU process: count StageMemory.runtime


def optimizer_factor(model_config):
    """Optimizer-state bytes per weight byte (AdamW: 2 fp32 moments, + fp32 master for low-precision params)."""
    param_bytes = DTYPE_BYTES[model_config.param_init_type]
    state = 8 + (4 if param_bytes != 4 else 0)
    return state / param_bytes


def recompute_modes(model_config, setup):
    total = model_config.num_hidden_layers + (model_config.num_nextn_predict_layers or 0)
    modes = setup.recompute if setup.recompute is not None else getattr(model_config, "recompute", None)
    if modes is None or modes is False:
        return ("none",) * total
    if modes is True:
        return ("full",) * total
    return tuple(modes)


def _stage_weights(parallel_config, layouts, placement, setup, trainable, param_bytes, state_bytes):
    """{stage: {"weights", "gradients", "optimizer", "gathered": {layer: bytes}}} per device."""
    shard_grads = parallel_config.optimizer_shard and (parallel_config.pipeline_stage == 1
                                                       or setup.gradient_accumulation_shard)
    threshold = setup.parallel_optimizer_threshold_kb * 1024
    per_stage = {stage.stage: {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "gathered": {}}
                 for stage in placement.stages}
    for layout in layouts:
        elements = layout.numel_per_device
        shardable = parallel_config.optimizer_shard and layout.shard_numel * param_bytes >= threshold
        divisor = layout.replicas if shardable else 1
        is_trainable = trainable.get(layout.name, True)
        for stage_id in layout.stages:
            sums = per_stage[stage_id]
            sums["weights"] += elements * param_bytes / divisor
            if shardable and divisor > 1:
                sums["gathered"][layout.layer] = sums["gathered"].get(layout.layer, 0.0) + elements * param_bytes
            if is_trainable:
                sums["gradients"] += elements * param_bytes / (divisor if shard_grads else 1)
                sums["optimizer"] += elements * state_bytes / divisor
    return per_stage


def stage_memory(model_config, parallel_config, hooks, layouts, placement, setup, trainable):
    """Per-stage memory (bytes per device) for every pipeline stage."""
    param_bytes = DTYPE_BYTES[model_config.param_init_type]
    state_bytes = optimizer_factor(model_config) * param_bytes
    seq = setup.seq_length or model_config.seq_length
    tokens = setup.micro_batch_size * seq
    modes = recompute_modes(model_config, setup)
    per_stage = _stage_weights(parallel_config, layouts, placement, setup, trainable, param_bytes, state_bytes)
    result = []
    for stage in placement.stages:
        sums = per_stage[stage.stage]
        in_flight = min(parallel_config.pipeline_stage - stage.stage, parallel_config.micro_batch_num) \
            if parallel_config.pipeline_stage > 1 else 1
        per_micro, per_micro_plain, peak_layer = _stage_activations(model_config, parallel_config, hooks, stage,
                                                                    seq, setup.fused_kernels, modes, tokens)
        extra = 0.0
        if stage.has_embedding:
            extra += embedding_activation_bytes_per_token(model_config, parallel_config)
        if stage.has_head:
            extra += terms_bytes(model_config,
                                 hooks.head_activation_terms(model_config, parallel_config, setup.fused_kernels))
        transient = max((terms_bytes(model_config, [term]) for term in hooks.backward_transient_terms(
            model_config, parallel_config, stage.has_head, setup.micro_batch_size, seq, setup.fused_kernels)),
            default=0.0)   # the phases of the backward run one after another: the largest counts
        result.append(StageMemory(
            stage=stage.stage, layers=stage.num_layers, weights=sums["weights"], gradients=sums["gradients"],
            optimizer=sums["optimizer"], gathered_weights=max(sums["gathered"].values(), default=0.0),
            activations=tokens * ((per_micro + extra) * in_flight + peak_layer) + transient,
            activations_without_recompute=tokens * (per_micro_plain + extra) * in_flight + transient,
            in_flight_micro_batches=in_flight,
            runtime=CPU_RUNTIME_BYTES if setup.host_runtime else 0.0))
    return result


def _stage_activations(model_config, parallel_config, hooks, stage, seq, fused, modes, tokens):
    """(per-token bytes with the configured recompute, without recompute, recompute peak of one layer)."""
    kept = plain = peak = 0.0
    for layer in stage.layer_ids:
        full = layer_activation_bytes_per_token(model_config, parallel_config, hooks, layer, seq, fused, "none",
                                                tokens)
        plain += full
        mode = modes[layer] if layer < len(modes) else "none"
        layer_kept = layer_activation_bytes_per_token(model_config, parallel_config, hooks, layer, seq, fused, mode,
                                                      tokens)
        kept += layer_kept
        # what backward re-materialises for one layer at a time: all of it (full), the core (selective)
        peak = max(peak, full - layer_kept if mode == "selective" else (full if mode == "full" else 0.0))
    return kept, plain, peak


def communication_per_step(model_config, parallel_config, layouts, placement, setup, trainable):
    """Bytes sent per device per training step, by kind (worst stage for per-stage kinds)."""
    act_bytes = DTYPE_BYTES[model_config.compute_dtype]
    param_bytes = DTYPE_BYTES[model_config.param_init_type]
    seq = setup.seq_length or model_config.seq_length
    tokens = setup.micro_batch_size * seq
    m, mp, ep = parallel_config.micro_batch_num, parallel_config.model_parallel, parallel_config.expert_parallel
    sp = parallel_config.sequence_parallel
    hidden_bytes = tokens * model_config.hidden_size * act_bytes
    modes = recompute_modes(model_config, setup)
    worst = {"dp_grad_allreduce": 0.0, "mp_collectives": 0.0, "expert_alltoall": 0.0, "pipeline_send_recv": 0.0}
    grad_by_stage = {stage.stage: 0.0 for stage in placement.stages}
    for layout in layouts:
        if trainable.get(layout.name, True) and layout.replicas > 1:
            group = layout.replicas
            for stage_id in layout.stages:
                grad_by_stage[stage_id] += 2 * (group - 1) / group * layout.numel_per_device * param_bytes
    for stage in placement.stages:
        grad = grad_by_stage[stage.stage]
        mp_volume = 0.0
        if mp > 1:
            per_allreduce = 2 * (mp - 1) / mp * hidden_bytes
            for layer in stage.layer_ids:
                passes = 4 + (2 if modes[layer] != "none" else 0)
                mp_volume += passes * per_allreduce * m
            if not parallel_config.vocab_emb_dp and (stage.has_embedding or stage.has_head):
                mp_volume += 2 * per_allreduce * m
        a2a = 0.0
        if ep > 1:
            moe_layers = sum(1 for layer in stage.layer_ids if _layer_is_moe(model_config, layer))
            a2a = moe_layers * m * 4 * model_config.num_experts_per_tok * hidden_bytes / sp * (ep - 1) / ep
        p2p = 0.0
        if parallel_config.pipeline_stage > 1:
            boundaries = (stage.stage > 0) + (stage.stage < parallel_config.pipeline_stage - 1)
            p2p = boundaries * m * hidden_bytes / sp
        for key, value in (("dp_grad_allreduce", grad), ("mp_collectives", mp_volume), ("expert_alltoall", a2a),
                           ("pipeline_send_recv", p2p)):
            worst[key] = max(worst[key], value)
    return worst


@dataclasses.dataclass
class Plan:
    model_config: object
    parallel_config: object
    setup: TrainingSetup
    placement: object
    layouts: list
    counts: dict
    stages: List[StageMemory]
    communication: Dict[str, float]
    flops_per_token: float
    device: str
    peak_flops: Optional[float]

    @property
    def worst_stage(self):
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def bubble_fraction(self):
        return self.placement.bubble_fraction


@dataclasses.dataclass
class ModelFacts:
    """What the plan needs from the model's spec, computed once per model config."""

    spec: object
    shapes: dict
    trainable: dict
    counts: dict
    flops_cache: dict


def model_facts(model_config, spec=None):
    """The parameter table, trainable flags and counts of `model_config` from its spec (found when not given)."""
    spec = spec or spec_for_config(model_config)
    specs = spec.parameter_specs(model_config)
    return ModelFacts(spec=spec, shapes={item.name: tuple(item.shape) for item in specs},
                      trainable={item.name: item.trainable for item in specs},
                      counts=spec.parameter_counts(model_config), flops_cache={})


def build_plan(model_config, parallel_config, setup=None, spec=None, device=DEFAULT_DEVICE, peak_tflops=None,
               facts=None):
    """Everything the planner prints, for a validated model config and parallel layout.

    `spec` is the model's ModelSpec (found from the config when not given). Pass
    `facts=model_facts(model_config, spec)` when planning several layouts of one model (the weight table of
    the 671B model has 46k entries).
    """
    setup = setup or TrainingSetup()
    facts = facts or model_facts(model_config, spec)
    spec = spec or facts.spec
    hooks = planning_hooks(spec)
    placement = place_layers(model_config, parallel_config)
    layouts = weight_layouts(facts.shapes, parallel_config, placement, spec.shard_table)
    trainable = facts.trainable
    seq = setup.seq_length or model_config.seq_length
    if seq not in facts.flops_cache:
        facts.flops_cache[seq] = hooks.flops_per_token(model_config, seq)
    return Plan(model_config=model_config, parallel_config=parallel_config, setup=setup, placement=placement,
                layouts=layouts, counts=facts.counts,
                stages=stage_memory(model_config, parallel_config, hooks, layouts, placement, setup, trainable),
                communication=communication_per_step(model_config, parallel_config, layouts, placement, setup,
                                                      trainable),
                flops_per_token=facts.flops_cache[seq],
                device=device, peak_flops=device_peak_flops(device, peak_tflops))
