"""Memory, FLOPs and communication of one training step, per device: the planner's and the trainer's model.

Everything here is arithmetic on the model config, the parallel layout and the weight table
(`research/deepseek3/weight_mapping.py` via `mindpretrain.parallel.layouts`), so it runs on a laptop
for the 1024-card layout. `tools/plan.py` prints it; the trainer's MFU uses `flops_per_token`.

## Memory per device (bytes), for each pipeline stage; the plan reports the worst stage

- **weights**: the device's shard of every parameter on its stage, in `param_init_type`.
- **gradients**: same elements (trainable parameters only), in `param_init_type` (MindSpore keeps
  gradients and, under pipeline parallelism, the accumulated micro-batch gradients in the parameter
  dtype).
- **optimizer state**: AdamW's two moments in fp32, plus an fp32 master copy when the parameters are not
  fp32 (12 bytes/element for bf16 parameters, 8 for fp32 ones). Optimizer factor = that over the weight bytes.
- **optimizer sharding** (`parallel.enable_parallel_optimizer`, MindSpore's parallel optimizer): weights
  and optimizer state of each parameter are split over the devices holding identical copies of it (its
  replica group: `dp` for tensor-parallel weights, `dp*mp` for replicated ones, `dp/ep` for routed
  experts), except parameters smaller than `parallel_optimizer_threshold` (64 KB). Gradients are split
  too when there is no pipeline accumulation (`pipeline_stage == 1`) or with
  `parallel_optimizer_config.gradient_accumulation_shard`. The full weights of one layer are gathered
  transiently in the forward pass (counted as `gathered_weights`).
- **activations**: see `activation_terms` — the tensors a layer keeps for its backward pass, per
  token, listed op by op for this repository's implementation (each RMSNorm keeps 3 x its width, the
  projections' inputs, the SwiGLU gate/up/silu/product, MLA's query/key/value/context, the routed
  tokens and expert intermediates with the dispatch padding), each divided by the tensor/sequence/expert
  split that applies to it. Two kernel sets are modelled:
  *fused* (Ascend: flash attention keeps only per-row softmax statistics, the cross-entropy keeps the
  fp32 logits and their softmax per head) and *reference* (this repository's MindSpore ops as written,
  what runs on CPU: `SCORE_RETAINED_PER_LAYER` score-sized `[b, heads, s, s]` tensors per layer, plus
  the backward temporaries `ATTENTION_BACKWARD_TRANSIENT` x scores and `HEAD_BACKWARD_TRANSIENT` x
  logits, and the expert weights the block dispatch gathers). The reference constants were measured
  on MindSpore 2.10 PyNative CPU with one- and two-layer models and are checked against a four-layer
  model with MTP at two sequence lengths by `tests/test_plan_memory.py` (within 20% of peak RSS).
  Recompute: a fully recomputed layer keeps only its input (`h` per token) and re-materialises one
  layer's activations during its backward; selective recompute (the model's: the attention core)
  drops the attention probabilities. Under 1F1B pipelining stage `i` holds `min(pp - i, m)`
  micro-batches in flight. The last stage adds the final norm and the logits of the main head and of
  every MTP depth.

## FLOPs per token

`6 * activated matmul parameters + attention`, where activated parameters are those one token passes
through (all non-expert matmuls, `num_experts_per_tok` routed experts and the shared experts per MoE
layer, the output head, and the MTP modules with their extra pass through the head; the embedding is a
lookup, not a matmul), and attention is `6 * s * heads * (qk_head_dim + v_head_dim)` per layer: the
forward `Q K^T` and `P V` take `2 s h_qk` and `2 s h_v` FLOPs per token and head, times 3 for forward
plus backward. This is PaLM's `12 L H Q T` (Chowdhery et al. 2022, appendix B) with MLA's distinct
query/key and value head dims, and without halving for the causal mask (the convention MFU figures use).

## Communication per device per step (bytes)

Ring algorithms: an all-reduce of `n` bytes over `g` devices sends `2 (g-1)/g * n` per device, an
all-gather or reduce-scatter `(g-1)/g * n`.
- `dp_grad_allreduce`: gradients over each parameter's replica group once per step (reduce-scatter +
  weight all-gather with optimizer sharding: the same volume).
- `mp_collectives`: 2 all-reduces (o_proj, FFN down) per layer forward and 2 backward of the
  micro-batch's hidden states (all-gather/reduce-scatter pairs with sequence parallelism, same volume),
  plus one more forward for recomputed layers; vocab-parallel head/embedding add one each.
- `expert_alltoall`: dispatch and combine of `k` copies of each token's hidden state, forward and
  backward, of which `(ep-1)/ep` leave the device.
- `pipeline_send_recv`: each stage boundary passes the micro-batch's hidden states forward and their
  gradient back, once per micro-batch.
"""
import dataclasses
import math
import re
from typing import Dict, List, Optional

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

# Constants of the "reference" kernels (this repository's MindSpore ops as written, MindSpore 2.10, PyNative
# CPU): how many score-sized [B, heads, S, S] and logits-sized [B*S, vocab] fp32 tensors exist besides the
# per-token terms listed in `activation_terms`. HEAD_RETAINED_PER_HEAD follows from the ops; the other three
# were fitted (least squares, then rounded) to tests/test_plan_memory.py's probe on one- and two-layer
# models with one head at S = 512 and 1024, and are checked, not fitted, on the test's model (3 layers +
# MTP, two heads) where they land within 5% of the measured peak. Re-fit with
# `python tests/test_plan_memory.py --calibrate` when the model's ops change:
SCORE_RETAINED_PER_LAYER = 0.49     # score-sized tensors kept per layer (the CPU core recomputes P in backward)
ATTENTION_BACKWARD_TRANSIENT = 6.21 # score-sized temporaries alive while one attention core runs backward
HEAD_RETAINED_PER_HEAD = 1          # the log-softmax output, kept for its backward
HEAD_BACKWARD_TRANSIENT = 1.62      # logits-sized temporaries of the cross-entropy + head backward
# "fused" kernels (Ascend: flash attention, fused cross-entropy, grouped-matmul experts) keep no score
# tensor (flash attention stores per-row statistics and recomputes scores) and the fp32 logits and their
# softmax per head.
FUSED_HEAD_RETAINED_PER_HEAD = 2
PARALLEL_OPTIMIZER_THRESHOLD_KB = 64


def device_peak_flops(device=DEFAULT_DEVICE, override_tflops=None):
    if override_tflops:
        return float(override_tflops) * 1e12
    return DEVICE_PEAK_FLOPS.get(device)


# ------------------------------------------------------------------------------------------- parameters
def parameter_counts(model_cfg):
    """Total/activated counts from the model's own counter (research/deepseek3/parameter_count.py)."""
    from research.deepseek3.parameter_count import count_parameters

    return count_parameters(model_cfg)


def _specs(model_cfg):
    from research.deepseek3.weight_mapping import parameter_specs

    return parameter_specs(model_cfg)


def activated_matmul_parameters(model_cfg):
    """Matmul weights one token passes through (main model + MTP), for the 6N FLOPs term."""
    k_over_e = model_cfg.num_experts_per_tok / model_cfg.n_routed_experts
    total = 0.0
    for spec in _specs(model_cfg):
        if len(spec.shape) != 2 or spec.group == "embedding":
            continue
        numel = math.prod(spec.shape)
        total += numel * k_over_e if spec.group == "routed_expert" else numel
    head = model_cfg.vocab_size * model_cfg.hidden_size
    if model_cfg.tie_word_embeddings:
        total += head          # the tied head is still a matmul
    total += head * (model_cfg.num_nextn_predict_layers or 0)   # each MTP depth runs the shared head again
    return total


def attention_flops_per_token(model_cfg, seq_length):
    layers = model_cfg.num_hidden_layers + (model_cfg.num_nextn_predict_layers or 0)
    head_dims = model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim + model_cfg.v_head_dim
    return 6.0 * layers * seq_length * model_cfg.num_attention_heads * head_dims


def flops_per_token(cfg, seq_length=None):
    """Training FLOPs (forward + backward) per token: 6 * activated matmul params + attention term."""
    seq_length = seq_length or cfg.seq_length
    return 6.0 * activated_matmul_parameters(cfg) + attention_flops_per_token(cfg, seq_length)


def mfu(tokens_per_second_per_device, cfg, seq_length=None, device=DEFAULT_DEVICE, peak_tflops=None):
    peak = device_peak_flops(device, peak_tflops)
    if not peak:
        return None
    return tokens_per_second_per_device * flops_per_token(cfg, seq_length) / peak


# ------------------------------------------------------------------------------------------- activations
def _layer_is_moe(model_cfg, layer):
    if hasattr(model_cfg, "is_moe_layer"):
        return model_cfg.is_moe_layer(layer)
    return layer >= model_cfg.first_k_dense_replace


def activation_terms(model_cfg, pc, layer, seq_length, fused_kernels, tokens=None):
    """Per-token activation elements one layer keeps for backward, as (name, elements, dtype key).

    dtype key: 'compute' (compute_dtype), 'norm' (layernorm_compute_type), 'softmax', 'fp32'. Each RMSNorm
    keeps its upcast input, the normalised value and its output (the next matmul's input): 3 x width.
    `tokens` (micro-batch tokens per device) sizes the reference MoE dispatch's padding and weight copies.
    """
    h, nh = model_cfg.hidden_size, model_cfg.num_attention_heads
    dq = model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim
    dv, rope, kl = model_cfg.v_head_dim, model_cfg.qk_rope_head_dim, model_cfg.kv_lora_rank
    ql = model_cfg.q_lora_rank or 0
    mp, sp = pc.model_parallel, pc.sequence_parallel
    terms = [
        ("attention and FFN input norms", 2 * 3 * h / sp, "norm"),
        ("q latent norm", 3 * ql / sp, "norm"),
        ("kv latent norm and shared rotary key", (3 * kl + rope) / sp, "norm"),
        ("rotary query halves", nh * rope / mp, "compute"),
        ("query and key (nope | rope) for Q K^T", 2 * nh * dq / mp, "compute"),
        ("value and attention context", 2 * nh * dv / mp, "compute"),
    ]
    if fused_kernels:
        terms.append(("flash-attention softmax statistics", 2 * nh / mp, "fp32"))
    else:
        terms.append(("attention probabilities", SCORE_RETAINED_PER_LAYER * nh * seq_length / mp, "softmax"))
    if layer >= model_cfg.num_hidden_layers:
        # MTP: enorm/hnorm (upcast + normalised), their concatenation (eh_proj input), shared_head.norm
        terms.append(("MTP norms, concatenation and shared-head norm", (2 + 2 + 2 + 3) * h / sp, "norm"))
    if not _layer_is_moe(model_cfg, layer):
        terms.append(("SwiGLU gate/up/silu/product", 4 * model_cfg.intermediate_size / mp, "compute"))
        return terms
    k, experts, emp = model_cfg.num_experts_per_tok, model_cfg.n_routed_experts, pc.expert_tensor_parallel
    width = model_cfg.moe_intermediate_size
    padding, weight_copies = 1.0, 0.0
    if not fused_kernels and tokens:
        padding, weight_copies = _reference_dispatch(model_cfg, tokens)
    terms += [
        ("router scores and balance-loss normalisation", 4 * experts / sp, "fp32"),
        ("dispatched tokens and routed outputs", (padding + 1) * k * h / sp, "compute"),
        ("routed experts gate/up/silu/product", padding * 4 * k * width / emp / sp, "compute"),
    ]
    if weight_copies:
        terms.append(("expert weights gathered per dispatch block", weight_copies / emp, "compute"))
    if model_cfg.n_shared_experts:
        terms.append(("shared experts gate/up/silu/product", 4 * width * model_cfg.n_shared_experts / mp,
                      "compute"))
    return terms


def _reference_dispatch(model_cfg, tokens):
    """(row padding factor, expert-weight elements per token) of the reference block dispatch in moe.py."""
    from research.deepseek3.moe import default_block_size, num_dispatch_blocks

    k, experts = model_cfg.num_experts_per_tok, model_cfg.n_routed_experts
    tokens = int(tokens)
    block = getattr(model_cfg, "moe_dispatch_block_size", None) or default_block_size(tokens * k, experts)
    blocks = num_dispatch_blocks(tokens, k, experts, block)
    padding = blocks * block / (tokens * k)
    # each block gathers its expert's gate/up/down weights and a transposed copy of each
    copies = blocks * 6 * model_cfg.moe_intermediate_size * model_cfg.hidden_size / tokens
    return padding, copies


SELECTIVE_DROPPED = ("attention probabilities",)   # the model's selective recompute: the attention core only


def _dtype_bytes(model_cfg, key):
    return {"compute": DTYPE_BYTES[model_cfg.compute_dtype],
            "norm": DTYPE_BYTES[model_cfg.layernorm_compute_type],
            "softmax": DTYPE_BYTES[model_cfg.softmax_compute_type],
            "fp32": 4, "int32": 4}[key]


def layer_activation_bytes_per_token(model_cfg, pc, layer, seq_length, fused_kernels, mode="none", tokens=None):
    """Bytes one layer keeps per token (per device) under recompute `mode` (none|selective|full)."""
    if mode == "full":
        return model_cfg.hidden_size / pc.sequence_parallel * DTYPE_BYTES[model_cfg.compute_dtype]
    total = 0.0
    for name, elements, key in activation_terms(model_cfg, pc, layer, seq_length, fused_kernels, tokens):
        if mode == "selective" and name in SELECTIVE_DROPPED:
            continue
        total += elements * _dtype_bytes(model_cfg, key)
    return total


def head_activation_bytes_per_token(model_cfg, pc, fused_kernels):
    """Last stage: the final norm, and per output head (main + each MTP depth) the fp32 logits kept."""
    heads = 1 + (model_cfg.num_nextn_predict_layers or 0)
    per_head = FUSED_HEAD_RETAINED_PER_HEAD if fused_kernels else HEAD_RETAINED_PER_HEAD
    norm = 3 * model_cfg.hidden_size / pc.sequence_parallel * DTYPE_BYTES[model_cfg.layernorm_compute_type]
    return norm + heads * per_head * model_cfg.vocab_size / pc.vocab_parallel * 4


def backward_transient_bytes(model_cfg, pc, stage, micro_batch_size, seq_length, fused_kernels):
    """Temporaries of the backward pass on top of what is kept (reference kernels): the attention core's
    score-sized gradients and, on the last stage, the cross-entropy/head gradients. Both are counted: the
    measured CPU peaks grow with both, i.e. the head's temporaries are not all reused by the attention's."""
    if fused_kernels:
        return 0.0
    scores = micro_batch_size * model_cfg.num_attention_heads / pc.model_parallel * seq_length * seq_length * \
        DTYPE_BYTES[model_cfg.softmax_compute_type]
    total = ATTENTION_BACKWARD_TRANSIENT * scores
    if stage.has_head:
        total += HEAD_BACKWARD_TRANSIENT * micro_batch_size * seq_length * model_cfg.vocab_size / pc.vocab_parallel * 4
    return total


def embedding_activation_bytes_per_token(model_cfg, pc):
    return model_cfg.hidden_size / pc.sequence_parallel * DTYPE_BYTES[model_cfg.compute_dtype]


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

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.gathered_weights + self.activations

    @property
    def total_without_recompute(self):
        return self.weights + self.gradients + self.optimizer + self.gathered_weights + \
            self.activations_without_recompute


@dataclasses.dataclass
class TrainingSetup:
    """What besides model and layout decides the cost of a step (read from the run YAML by `from_run_config`)."""

    micro_batch_size: int = 1
    seq_length: Optional[int] = None
    fused_kernels: bool = True               # Ascend: flash attention etc.; False: this repo's ops (CPU)
    recompute: Optional[tuple] = None        # per-layer modes (main + MTP); None: the model config's
    gradient_accumulation_shard: bool = False
    parallel_optimizer_threshold_kb: float = PARALLEL_OPTIMIZER_THRESHOLD_KB


def optimizer_factor(model_cfg):
    """Optimizer-state bytes per weight byte (AdamW: 2 fp32 moments, + fp32 master for low-precision params)."""
    param_bytes = DTYPE_BYTES[model_cfg.param_init_type]
    state = 8 + (4 if param_bytes != 4 else 0)
    return state / param_bytes


def recompute_modes(model_cfg, setup):
    total = model_cfg.num_hidden_layers + (model_cfg.num_nextn_predict_layers or 0)
    modes = setup.recompute if setup.recompute is not None else getattr(model_cfg, "recompute", None)
    if modes is None or modes is False:
        return ("none",) * total
    if modes is True:
        return ("full",) * total
    return tuple(modes)


def stage_memory(model_cfg, pc, layouts, placement, setup, trainable):
    """Per-stage memory (bytes per device) for every pipeline stage."""
    param_bytes = DTYPE_BYTES[model_cfg.param_init_type]
    state_bytes = optimizer_factor(model_cfg) * param_bytes
    seq = setup.seq_length or model_cfg.seq_length
    tokens = setup.micro_batch_size * seq
    modes = recompute_modes(model_cfg, setup)
    shard_grads = pc.optimizer_shard and (pc.pipeline_stage == 1 or setup.gradient_accumulation_shard)
    threshold = setup.parallel_optimizer_threshold_kb * 1024
    per_stage = {stage.stage: {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "gathered": {}}
                 for stage in placement.stages}
    for layout in layouts:
        elements = layout.numel_per_device
        shardable = pc.optimizer_shard and layout.shard_numel * param_bytes >= threshold
        divisor = layout.replicas if shardable else 1
        is_trainable = trainable.get(layout.name, True)
        for stage_id in layout.stages:
            sums = per_stage[stage_id]
            sums["weights"] += elements * param_bytes / divisor
            if shardable and divisor > 1:
                layer = _layer_of(layout.name)
                sums["gathered"][layer] = sums["gathered"].get(layer, 0.0) + elements * param_bytes
            if is_trainable:
                sums["gradients"] += elements * param_bytes / (divisor if shard_grads else 1)
                sums["optimizer"] += elements * state_bytes / divisor
    result = []
    for stage in placement.stages:
        sums = per_stage[stage.stage]
        in_flight = min(pc.pipeline_stage - stage.stage, pc.micro_batch_num) if pc.pipeline_stage > 1 else 1
        per_micro, per_micro_plain, peak_layer = _stage_activations(model_cfg, pc, stage, seq,
                                                                    setup.fused_kernels, modes, tokens)
        extra = 0.0
        if stage.has_embedding:
            extra += embedding_activation_bytes_per_token(model_cfg, pc)
        if stage.has_head:
            extra += head_activation_bytes_per_token(model_cfg, pc, setup.fused_kernels)
        transient = backward_transient_bytes(model_cfg, pc, stage, setup.micro_batch_size, seq, setup.fused_kernels)
        result.append(StageMemory(
            stage=stage.stage, layers=stage.num_layers, weights=sums["weights"], gradients=sums["gradients"],
            optimizer=sums["optimizer"], gathered_weights=max(sums["gathered"].values(), default=0.0),
            activations=tokens * ((per_micro + extra) * in_flight + peak_layer) + transient,
            activations_without_recompute=tokens * (per_micro_plain + extra) * in_flight + transient,
            in_flight_micro_batches=in_flight))
    return result


def _stage_activations(model_cfg, pc, stage, seq, fused, modes, tokens):
    """(per-token bytes with the configured recompute, without recompute, recompute peak of one layer)."""
    kept = plain = peak = 0.0
    for layer in stage.layer_ids:
        full = layer_activation_bytes_per_token(model_cfg, pc, layer, seq, fused, "none", tokens)
        plain += full
        mode = modes[layer] if layer < len(modes) else "none"
        layer_kept = layer_activation_bytes_per_token(model_cfg, pc, layer, seq, fused, mode, tokens)
        kept += layer_kept
        # what backward re-materialises for one layer at a time: all of it (full), the core (selective)
        peak = max(peak, full - layer_kept if mode == "selective" else (full if mode == "full" else 0.0))
    return kept, plain, peak


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def _layer_of(name):
    match = _LAYER_NAME.match(name)
    return int(match.group(1)) if match else None


def communication_per_step(model_cfg, pc, layouts, placement, setup, trainable):
    """Bytes sent per device per training step, by kind (worst stage for per-stage kinds)."""
    act_bytes = DTYPE_BYTES[model_cfg.compute_dtype]
    param_bytes = DTYPE_BYTES[model_cfg.param_init_type]
    seq = setup.seq_length or model_cfg.seq_length
    tokens = setup.micro_batch_size * seq
    m, mp, ep = pc.micro_batch_num, pc.model_parallel, pc.expert_parallel
    hidden_bytes = tokens * model_cfg.hidden_size * act_bytes
    modes = recompute_modes(model_cfg, setup)
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
            if not pc.vocab_emb_dp and (stage.has_embedding or stage.has_head):
                mp_volume += 2 * per_allreduce * m
        a2a = 0.0
        if ep > 1:
            moe_layers = sum(1 for layer in stage.layer_ids if _layer_is_moe(model_cfg, layer))
            a2a = moe_layers * m * 4 * model_cfg.num_experts_per_tok * hidden_bytes / pc.sequence_parallel * \
                (ep - 1) / ep
        p2p = 0.0
        if pc.pipeline_stage > 1:
            boundaries = (stage.stage > 0) + (stage.stage < pc.pipeline_stage - 1)
            p2p = boundaries * m * hidden_bytes / pc.sequence_parallel
        for key, value in (("dp_grad_allreduce", grad), ("mp_collectives", mp_volume), ("expert_alltoall", a2a),
                           ("pipeline_send_recv", p2p)):
            worst[key] = max(worst[key], value)
    return worst


@dataclasses.dataclass
class Plan:
    model_cfg: object
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
    """What the plan needs from the model's weight table, computed once per model config."""

    shapes: dict
    trainable: dict
    counts: dict
    flops_cache: dict


def model_facts(model_cfg):
    specs = _specs(model_cfg)
    return ModelFacts(shapes={spec.name: tuple(spec.shape) for spec in specs},
                      trainable={spec.name: spec.trainable for spec in specs},
                      counts=parameter_counts(model_cfg), flops_cache={})


def build_plan(model_cfg, pc, setup=None, device=DEFAULT_DEVICE, peak_tflops=None, facts=None):
    """Everything the planner prints, for a validated model config and parallel layout.

    Pass `facts=model_facts(cfg)` when planning several layouts of one model (the weight table of
    the 671B model has 46k entries).
    """
    setup = setup or TrainingSetup()
    facts = facts or model_facts(model_cfg)
    placement = place_layers(model_cfg, pc)
    layouts = weight_layouts(facts.shapes, pc, placement)
    trainable = facts.trainable
    seq = setup.seq_length or model_cfg.seq_length
    if seq not in facts.flops_cache:
        facts.flops_cache[seq] = flops_per_token(model_cfg, seq)
    return Plan(model_cfg=model_cfg, parallel_config=pc, setup=setup, placement=placement, layouts=layouts,
                counts=facts.counts,
                stages=stage_memory(model_cfg, pc, layouts, placement, setup, trainable),
                communication=communication_per_step(model_cfg, pc, layouts, placement, setup, trainable),
                flops_per_token=facts.flops_cache[seq],
                device=device, peak_flops=device_peak_flops(device, peak_tflops))
