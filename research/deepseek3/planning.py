"""What DeepSeek-V3's own ops cost: the planner hooks (`mindpretrain.model_spec.PlanningHooks`) of this plugin.

The core planner (`mindpretrain.planning.cost_model`) knows stages, optimizer sharding, dtypes, recompute and
communication; it asks this module which tensors MLA, DeepSeekMoE, MTP and the output head keep per token and
how many FLOPs a token costs, because those follow from how `research/deepseek3` computes them. The formulas
and conventions are in docs/planner.md.

The reference-kernel constants below describe this repository's ops as written (MindSpore 2.10, PyNative
CPU): how many score-sized [B, heads, S, S] and logits-sized [B*S, vocab] fp32 tensors exist besides the
per-token terms, counted as MindSpore's memory pool counts them. HEAD_RETAINED_PER_HEAD follows from the ops;
the other three were fitted (least squares, then rounded) to the pool's peak on four one- and two-layer
probes and are checked, not fitted, by tests/planning/test_plan_memory.py. Re-fit
them with `python tests/planning/test_plan_memory.py --calibrate` when the model's ops change. The functions read the
constants at call time, so the calibration can set them on this module.
"""
import math

SCORE_RETAINED_PER_LAYER = 0.19     # score-sized tensors kept per layer (the CPU core recomputes P in backward)
ATTENTION_BACKWARD_TRANSIENT = 2.06  # score-sized temporaries alive while one attention core runs backward
HEAD_RETAINED_PER_HEAD = 1          # the log-softmax output, kept for its backward
HEAD_BACKWARD_TRANSIENT = 2.07      # logits-sized temporaries of the cross-entropy + head backward
# "fused" kernels (Ascend: flash attention, fused cross-entropy, grouped-matmul experts) keep no score
# tensor (flash attention stores per-row statistics and recomputes scores) and the fp32 logits and their
# softmax per head.
FUSED_HEAD_RETAINED_PER_HEAD = 2

SELECTIVE_RECOMPUTE_DROPS = ("attention probabilities",)   # the model's selective recompute: the attention core


# ------------------------------------------------------------------------------------------- FLOPs
def activated_matmul_parameters(model_config):
    """Matmul weights one token passes through (main model + MTP), for the 6N FLOPs term."""
    from research.deepseek3.weight_mapping import parameter_specs

    k_over_e = model_config.num_experts_per_tok / model_config.n_routed_experts
    total = 0.0
    for spec in parameter_specs(model_config):
        if len(spec.shape) != 2 or spec.group == "embedding":
            continue
        numel = math.prod(spec.shape)
        total += numel * k_over_e if spec.group == "routed_expert" else numel
    head = model_config.vocab_size * model_config.hidden_size
    if model_config.tie_word_embeddings:
        total += head          # the tied head is still a matmul
    total += head * (model_config.num_nextn_predict_layers or 0)   # each MTP depth runs the shared head again
    return total


def attention_flops_per_token(model_config, seq_length):
    """`Q K^T` and `P V` of every layer (MTP included), forward + backward, without halving for the mask."""
    layers = model_config.num_hidden_layers + (model_config.num_nextn_predict_layers or 0)
    head_dims = model_config.qk_nope_head_dim + model_config.qk_rope_head_dim + model_config.v_head_dim
    return 6.0 * layers * seq_length * model_config.num_attention_heads * head_dims


def flops_per_token(model_config, seq_length=None):
    """Training FLOPs (forward + backward) per token: 6 * activated matmul params + attention term."""
    seq_length = seq_length or model_config.seq_length
    return 6.0 * activated_matmul_parameters(model_config) + attention_flops_per_token(model_config, seq_length)


# ------------------------------------------------------------------------------------------- activations
def layer_activation_terms(model_config, parallel_config, layer, seq_length, fused_kernels, tokens=None):
    """Per-token activation elements one layer keeps for backward, as (name, elements, dtype key).

    Each RMSNorm keeps its upcast input, the normalised value and its output (the next matmul's input):
    3 x width. `tokens` (micro-batch tokens per device) sizes the reference MoE dispatch's padding and weight
    copies.
    """
    h, nh = model_config.hidden_size, model_config.num_attention_heads
    dq = model_config.qk_nope_head_dim + model_config.qk_rope_head_dim
    dv, rope, kl = model_config.v_head_dim, model_config.qk_rope_head_dim, model_config.kv_lora_rank
    ql = model_config.q_lora_rank or 0
    mp, sp = parallel_config.model_parallel, parallel_config.sequence_parallel
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
    if layer >= model_config.num_hidden_layers:
        # MTP: enorm/hnorm (upcast + normalised), their concatenation (eh_proj input), shared_head.norm
        terms.append(("MTP norms, concatenation and shared-head norm", (2 + 2 + 2 + 3) * h / sp, "norm"))
    if not model_config.is_moe_layer(layer):
        terms.append(("SwiGLU gate/up/silu/product", 4 * model_config.intermediate_size / mp, "compute"))
        return terms
    return terms + _moe_terms(model_config, parallel_config, fused_kernels, tokens)


def _moe_terms(model_config, parallel_config, fused_kernels, tokens):
    """The router, the routed tokens and experts (with the dispatch's padding or capacity) and the shared
    experts."""
    k, experts = model_config.num_experts_per_tok, model_config.n_routed_experts
    emp, sp = parallel_config.expert_tensor_parallel, parallel_config.sequence_parallel
    h, width = model_config.hidden_size, model_config.moe_intermediate_size
    terms = [("router scores and balance-loss normalisation", 4 * experts / sp, "fp32")]
    dispatch = getattr(model_config, "moe_dispatch", None)
    if dispatch is None and not fused_kernels and parallel_config.expert_parallel == 1:
        from research.deepseek3.moe import reference_moe_dispatch   # moe.py imports MindSpore
        dispatch = reference_moe_dispatch(model_config)
    if dispatch == "capacity" and tokens:
        terms += capacity_dispatch_terms(model_config, parallel_config, tokens)
    elif dispatch == "grouped_matmul" and parallel_config.expert_parallel > 1:
        terms += exchanged_dispatch_terms(model_config, parallel_config)
    elif dispatch == "dense":       # every expert on every token (dense_dispatch.py), no weight copies
        terms += [("dispatched tokens and routed outputs", (k + experts) * h / sp, "compute"),
                  ("routed experts gate/up/silu/product", experts * 4 * width / emp / sp, "compute")]
    else:
        padding, weight_copies = 1.0, 0.0
        if not fused_kernels and tokens:
            padding, weight_copies = _reference_dispatch(model_config, tokens)
        terms += [("dispatched tokens and routed outputs", (padding + 1) * k * h / sp, "compute"),
                  ("routed experts gate/up/silu/product", padding * 4 * k * width / emp / sp, "compute")]
        if weight_copies:
            terms.append(("expert weights gathered per dispatch block", weight_copies / emp, "compute"))
    if model_config.n_shared_experts:
        terms.append(("shared experts gate/up/silu/product",
                      4 * width * model_config.n_shared_experts / parallel_config.model_parallel, "compute"))
    return terms


def capacity_dispatch_terms(model_config, parallel_config, tokens):
    """Per-token kept buffers of the capacity dispatch (capacity_dispatch.py) for `tokens` = n, the tokens of a
    data-parallel shard (micro batch x seq per device under semi-auto parallel). A device holds the E*C expert
    rows of one shard (E/ep experts x dp/dp_ep shards' C rows), where the other dispatches hold K per token:
    the expert inputs and activations scale by E*C / (K*n) instead; plus the gathered outputs [n*K, H] and the
    int32 slot/combine indices. The token side is split by dp only (never by the sequence)."""
    from research.deepseek3.capacity_dispatch import DEFAULT_CAPACITY_FACTOR, capacity_footprint   # MindSpore

    tokens = int(tokens)
    h, width = model_config.hidden_size, model_config.moe_intermediate_size
    footprint = capacity_footprint(tokens, model_config.num_experts_per_tok, model_config.n_routed_experts,
                                   getattr(model_config, "moe_capacity_factor", DEFAULT_CAPACITY_FACTOR), h)
    rows_per_token = footprint["expert_rows"] / tokens
    return [
        ("dispatched tokens and routed outputs",
         (footprint["expert_input_elements"] + footprint["gathered_output_elements"]) / tokens, "compute"),
        ("routed experts gate/up/silu/product",
         rows_per_token * 4 * width / parallel_config.expert_tensor_parallel, "compute"),
        ("capacity dispatch slot and combine indices", footprint["index_elements"] / tokens, "int32"),
    ]


def exchanged_dispatch_terms(model_config, parallel_config):
    """Per-token kept buffers of the dropless exchanged dispatch (exchanged_experts.py): each of the dp x mp
    devices takes 1/mp of a data-parallel shard's tokens and, with the load balanced, receives K rows per token
    (the aux-loss-free bias keeps it near that; a device receiving r x the mean holds r x these rows): the rows
    sorted by expert and the routed outputs [K, H], the experts' gate/up/silu/product [K, 4 I] (whole experts:
    expert tensor parallel 1), and two int32 sort orders per row (send, local)."""
    k, mp = model_config.num_experts_per_tok, parallel_config.model_parallel
    h, width = model_config.hidden_size, model_config.moe_intermediate_size
    return [("exchanged token rows and routed outputs", 2 * k * h / mp, "compute"),
            ("routed experts gate/up/silu/product", 4 * k * width / mp, "compute"),
            ("exchange sort orders", 4 * k / mp, "int32")]


def _reference_dispatch(model_config, tokens):
    """(row padding factor, expert-weight elements per token) of the reference block dispatch in moe.py."""
    from research.deepseek3.moe import default_block_size, num_dispatch_blocks   # moe.py imports MindSpore

    k, experts = model_config.num_experts_per_tok, model_config.n_routed_experts
    tokens = int(tokens)
    block = getattr(model_config, "moe_dispatch_block_size", None) or default_block_size(tokens * k, experts)
    blocks = num_dispatch_blocks(tokens, k, experts, block)
    padding = blocks * block / (tokens * k)
    # each block gathers its expert's gate/up/down weights and a transposed copy of each
    copies = blocks * 6 * model_config.moe_intermediate_size * model_config.hidden_size / tokens
    return padding, copies


def head_activation_terms(model_config, parallel_config, fused_kernels):
    """Last stage, per token: the final norm, and per output head (main + each MTP depth) the fp32 logits kept."""
    heads = 1 + (model_config.num_nextn_predict_layers or 0)
    per_head = FUSED_HEAD_RETAINED_PER_HEAD if fused_kernels else HEAD_RETAINED_PER_HEAD
    return [("final norm", 3 * model_config.hidden_size / parallel_config.sequence_parallel, "norm"),
            ("logits kept per output head", heads * per_head * model_config.vocab_size / parallel_config.vocab_parallel,
             "fp32")]


def backward_transient_terms(model_config, parallel_config, has_head, micro_batch_size, seq_length, fused_kernels):
    """Temporaries of the backward pass on top of what is kept (reference kernels), one term per phase: an
    attention core's score-sized gradients and, on the last stage, the cross-entropy/head gradients. The
    head's backward is over before any attention core's starts, so the planner counts the larger (CPU pool:
    the head's phase holds two logits-sized tensors, an attention core's P, dP and P * dP)."""
    if fused_kernels:
        return []
    scores = micro_batch_size * model_config.num_attention_heads / parallel_config.model_parallel * \
        seq_length * seq_length
    terms = [("attention-core backward temporaries", ATTENTION_BACKWARD_TRANSIENT * scores, "softmax")]
    if has_head:
        terms.append(("cross-entropy and head backward temporaries", HEAD_BACKWARD_TRANSIENT * micro_batch_size *
                      seq_length * model_config.vocab_size / parallel_config.vocab_parallel, "fp32"))
    return terms
