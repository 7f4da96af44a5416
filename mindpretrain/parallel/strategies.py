"""MindSpore `.shard()` strategies for every op kind of DeepSeek-V3, derived from one table.

A strategy says, for each input of a primitive, how many parts each dimension is cut into; MindSpore
(SEMI_AUTO_PARALLEL, Ascend) inserts the collectives that make the cut consistent. The strategies
here are written in mesh symbols and resolved against a `ParallelConfig`:

- `dp` data parallel, `mp` model parallel, `sp` sequence split of norm/residual activations (`mp` with
  `use_seq_parallel`, else 1), `ep` expert parallel, `emp` tensor parallel inside an expert,
  `dp_ep` the data-parallel replicas left inside an expert group (`dp / ep`), `vocab` the vocabulary
  split (`mp`, or 1 with `vocab_emb_dp`), and products such as `dp*sp`.

The projections' strategies are not written by hand: `MatMul(x, W^T)` with `W` split as in
`layouts.WEIGHT_KINDS` takes `x` split on tokens by `dp` (or `dp*sp` for the small replicated
projections that read sequence-parallel activations, as MindFormers does) and on its contracted
dimension exactly like `W`'s input dimension. Everything else (attention batch-matmuls, softmax, norms,
SwiGLU, router, expert batch-matmuls, embedding gather, loss) is in `OP_SYMBOLS` below, next to the
tensor layout it assumes.

On CPU nothing is applied: `op_strategies(pc)` is computed and tested, and `apply_shard_strategies`
returns a report saying it skipped because the parallel mode is not (semi-)auto parallel.
"""
import dataclasses
import math
from typing import List, Tuple

from mindpretrain.parallel.layouts import KIND_SPLITS, weight_kind
from mindpretrain.utils.logging import get_logger

logger = get_logger("parallel.strategies")

# Tensor layouts assumed: attention tensors [B, N(heads), S, D]; hidden states [B, S, H];
# token-major matrices [T = B*S, features]; routed-expert tensors [E, T_e (tokens per expert), features].
OP_SYMBOLS = {
    # --- multi-head latent attention core -----------------------------------------------------------------
    "attention.rope_mul": (("dp", "mp", None, None), (None, None, None, None)),     # q_pe * cos/sin
    "attention.k_rope_mul": (("dp", None, None, None), (None, None, None, None)),   # shared k_pe (1 head)
    "attention.k_pe_broadcast": (("dp", None, None, None),),                         # k_pe -> every head
    "attention.qk_concat": (("dp", "mp", None, None), ("dp", "mp", None, None)),     # [q_nope | q_pe]
    "attention.qk_bmm": (("dp", "mp", None, None), ("dp", "mp", None, None)),        # Q K^T
    "attention.scale_mul": (("dp", "mp", None, None), ()),
    "attention.mask_add": (("dp", "mp", None, None), (None, None, None, None)),
    "attention.softmax": (("dp", "mp", None, None),),
    "attention.pv_bmm": (("dp", "mp", None, None), ("dp", "mp", None, None)),        # P V
    "attention.latent_norm": (("dp", None, None), (None,)),                          # RMSNorm of q/kv latents
    # --- block-level --------------------------------------------------------------------------------------
    "norm": (("dp", "sp", None), (None,)),                                           # RMSNorm [B,S,H]
    "residual_add": (("dp", "sp", None), ("dp", "sp", None)),
    "mlp.silu": (("dp", "mp"),),
    "mlp.swiglu_mul": (("dp", "mp"), ("dp", "mp")),
    # --- MoE ----------------------------------------------------------------------------------------------
    "moe.router_sigmoid": (("dp", None),),
    "moe.router_bias_add": (("dp", None), (None,)),
    "moe.topk": (("dp", None),),
    "moe.expert_gate_proj": (("ep", "dp_ep", None), ("ep", "emp", None)),            # BMM x [E,T,H] @ W^T
    "moe.expert_up_proj": (("ep", "dp_ep", None), ("ep", "emp", None)),
    "moe.expert_silu": (("ep", "dp_ep", "emp"),),
    "moe.expert_swiglu_mul": (("ep", "dp_ep", "emp"), ("ep", "dp_ep", "emp")),
    "moe.expert_down_proj": (("ep", "dp_ep", "emp"), ("ep", None, "emp")),           # W [E,H,I] split on I
    "moe.combine_mul": (("dp", None, None), ("dp", None, None)),                     # y [T,K,H] * w [T,K,1]
    "moe.shared_silu": (("dp", "mp"),),
    "moe.shared_swiglu_mul": (("dp", "mp"), ("dp", "mp")),
    # --- embedding, MTP, head, loss -----------------------------------------------------------------------
    "embedding.gather": (("vocab", None), ("dp", None)),                             # table [V,H], ids [B,S]
    "mtp.concat": (("dp", None, None), ("dp", None, None)),                          # [enorm(e) | hnorm(h)]
    "loss.log_softmax": (("dp", "vocab"),),                                          # logits [T, V]
    "loss.nll_gather": (("dp", "vocab"), ("dp",)),
}

# Projections: op kind == weight kind; x [T, in] @ W[out, in]^T.
MATMUL_OPS = ("attention.q_a_proj", "attention.q_b_proj", "attention.q_proj", "attention.kv_a_proj",
              "attention.kv_b_proj", "attention.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
              "moe.router", "moe.shared_gate_proj", "moe.shared_up_proj", "moe.shared_down_proj",
              "mtp.eh_proj", "lm_head")

OP_KINDS = tuple(OP_SYMBOLS) + MATMUL_OPS

# Primitive attributes recognised on any cell that declares no `shard_ops` of its own
# (research/deepseek3/mla.py's AttentionCore).
PRIMITIVE_ATTRIBUTES = {"scores_matmul": "attention.qk_bmm", "context_matmul": "attention.pv_bmm"}


def symbol_sizes(pc):
    """Mesh symbol -> number of parts under parallel config `pc`."""
    return {"dp": pc.data_parallel, "mp": pc.model_parallel, "ep": pc.expert_parallel,
            "emp": pc.expert_tensor_parallel, "sp": pc.sequence_parallel, "vocab": pc.vocab_parallel,
            "dp_ep": pc.data_parallel // pc.expert_parallel}


def resolve(symbol, sizes):
    if symbol is None:
        return 1
    return math.prod(sizes[part] for part in symbol.split("*"))


def matmul_symbols(kind, pc):
    """(x symbols, W symbols) of `x [T, in] @ W[out, in]^T` for a weight kind of layouts.WEIGHT_KINDS."""
    out_split, in_split = KIND_SPLITS[kind]
    if out_split is None and in_split is None:
        tokens = "dp*sp" if pc.use_seq_parallel else "dp"      # replicated weight reads seq-parallel input
    else:
        tokens = "dp"
    return ((tokens, in_split), (out_split, in_split))


def op_strategy_symbols(kind, pc):
    if kind in OP_SYMBOLS:
        return OP_SYMBOLS[kind]
    if kind in MATMUL_OPS:
        return matmul_symbols(kind, pc)
    raise KeyError(f"unknown op kind {kind!r}; known: {', '.join(OP_KINDS)}")


def op_strategy(kind, pc):
    """The `.shard()` in_strategy tuple of op `kind` under parallel config `pc`."""
    sizes = symbol_sizes(pc)
    return tuple(tuple(resolve(symbol, sizes) for symbol in entry) for entry in op_strategy_symbols(kind, pc))


def op_strategies(pc):
    """Every op kind -> its in_strategy tuple."""
    return {kind: op_strategy(kind, pc) for kind in OP_KINDS}


def op_out_strategy(kind, pc):
    """out_strategy for row-parallel projections under sequence parallelism, else None.

    A row-parallel matmul (`o_proj`, `down_proj`) produces partial sums over `mp`; asking for the output
    split `(dp*mp, 1)` on tokens turns the all-reduce into a reduce-scatter that leaves the result
    sequence-parallel for the following norm/residual (MindFormers does the same).
    """
    if kind in MATMUL_OPS and pc.use_seq_parallel and pc.model_parallel > 1 and KIND_SPLITS[kind][1] == "mp":
        return ((pc.data_parallel * pc.model_parallel, 1),)
    return None


# Rank of the input a projection cell receives (hidden states [B, S, features] unless listed).
INPUT_RANK = {"moe.router": 2}          # the router sees tokens flattened to [B*S, H]


# ------------------------------------------------------------------------------------- applying to a model
@dataclasses.dataclass
class ShardReport:
    applied: bool
    reason: str
    planned: List[Tuple[str, str, str, tuple]] = dataclasses.field(default_factory=list)  # (cell, target, kind, strat)
    unmatched_kinds: Tuple[str, ...] = ()


def _parallel_mode():
    import mindspore as ms

    return str(ms.get_auto_parallel_context("parallel_mode"))


def plan_shard_calls(model, pc):
    """The `.shard` calls `apply_shard_strategies` would make, without making them.

    - a cell with a 2-D `weight` Parameter whose name is a projection kind of `layouts.WEIGHT_KINDS`:
      its `matmul` primitive when it has one (`nn.Dense`), else the cell itself
      (`Cell.shard(in_strategy, parameter_plan)`, completed by MindSpore's sharding propagation);
    - a cell exposing `shard_ops = {attribute: op kind}`: those primitives (without it, the attribute
      names of `PRIMITIVE_ATTRIBUTES`).
    Ops not reached this way are left to sharding propagation (MindFormers' DeepSeek-V3 YAML uses
    `search_mode: sharding_propagation`).
    """
    planned, seen_kinds = [], set()
    for path, cell in model.cells_and_names():
        weight = getattr(cell, "weight", None)
        if weight is not None and hasattr(weight, "name") and len(getattr(weight, "shape", ())) == 2:
            try:
                kind = weight_kind(weight.name)[0]
            except ValueError:
                kind = None
            if kind in MATMUL_OPS:
                target = "matmul" if _is_primitive(getattr(cell, "matmul", None)) else "cell"
                planned.append((path, target, kind, op_strategy(kind, pc)))
                seen_kinds.add(kind)
            elif kind == "embedding":
                planned.append((path, "cell", kind, op_strategy("embedding.gather", pc)))
                seen_kinds.add("embedding.gather")
        hooks = getattr(cell, "shard_ops", None)
        if hooks is None:
            hooks = {attribute: kind for attribute, kind in PRIMITIVE_ATTRIBUTES.items()
                     if _is_primitive(getattr(cell, attribute, None))}
        for attribute, kind in hooks.items():
            planned.append((path, attribute, kind, op_strategy(kind, pc)))
            seen_kinds.add(kind)
    unmatched = tuple(kind for kind in OP_KINDS if kind not in seen_kinds)
    return planned, unmatched


def _cell_shard_arguments(cell, kind, strategy, pc):
    """`Cell.shard` arguments for a projection/embedding cell without a primitive of its own.

    A projection's input rank is `cell.input_rank` if the cell declares one, else `INPUT_RANK` of its
    kind (default 3: hidden states [B, S, features]); dimensions between batch and features stay whole.
    """
    if kind == "embedding":
        table, ids = strategy
        return {"in_strategy": (tuple(ids),),                     # token ids [B, S]
                "parameter_plan": {cell.weight.name: tuple(table)}}
    rank = int(getattr(cell, "input_rank", INPUT_RANK.get(kind, 3)))
    activation, weight = strategy
    tokens, contracted = activation
    leading = (tokens,) + (1,) * (rank - 2)
    arguments = {"in_strategy": (leading + (contracted,),), "parameter_plan": {cell.weight.name: tuple(weight)}}
    out = op_out_strategy(kind, pc)
    if out is not None:
        arguments["out_strategy"] = ((out[0][0],) + (1,) * (rank - 1),)
    return arguments


def _is_primitive(obj):
    try:
        from mindspore.ops import Primitive
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Primitive)


def apply_shard_strategies(model, pc, force=False):
    """Call `.shard` on the model's primitives/cells (SEMI_AUTO_PARALLEL / AUTO_PARALLEL on Ascend only).

    In any other parallel mode (STAND_ALONE on CPU, DATA_PARALLEL) it changes nothing and returns a
    report with `applied=False` and the reason, so callers can log it instead of guessing.
    """
    planned, unmatched = plan_shard_calls(model, pc)
    mode = _parallel_mode()
    if mode not in ("semi_auto_parallel", "auto_parallel") and not force:
        reason = (f"parallel_mode is {mode}: shard strategies only take effect under semi_auto_parallel/"
                  "auto_parallel (Ascend); computed, not applied")
        logger.info("apply_shard_strategies skipped: %s (%d calls planned)", reason, len(planned))
        return ShardReport(False, reason, planned, unmatched)
    cells = dict(model.cells_and_names())
    for path, target, kind, strategy in planned:
        cell = cells[path]
        if target == "cell":
            cell.shard(**_cell_shard_arguments(cell, kind, strategy, pc))
        else:
            out = op_out_strategy(kind, pc)
            primitive = getattr(cell, target)
            if out is None:
                primitive.shard(strategy)
            else:
                primitive.shard(strategy, out)
    logger.info("applied %d shard strategies; left to sharding propagation: %s", len(planned),
                ", ".join(unmatched) or "nothing")
    return ShardReport(True, f"applied under {mode}", planned, unmatched)
