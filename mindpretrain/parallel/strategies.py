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

Which primitive has which kind is declared by the model, not guessed here: a cell that computes through
primitives held as attributes exposes `shard_ops = {attribute name: op kind}` (research/deepseek3/layers.py
explains the convention), and `apply_shard_strategies` walks the cells and shards exactly those primitives.
Ops that no cell declares are left to sharding propagation and listed in the report (`unmatched_kinds`).

On CPU nothing is applied: `op_strategies(pc)` is computed and tested, and `apply_shard_strategies`
returns a report saying it skipped because the parallel mode is not (semi-)auto parallel (`force=True`
records the strategies on the primitives anyway; stand-alone execution ignores them).
"""
import dataclasses
import math
from typing import List, Tuple

from mindpretrain.parallel.layouts import KIND_SPLITS
from mindpretrain.utils.logging import get_logger

logger = get_logger("parallel.strategies")

from research.deepseek3.sharding import MATMUL_OPS, OP_KINDS, OP_SYMBOLS  # noqa: E402  (transitional)


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


# ------------------------------------------------------------------------------------- applying to a model
@dataclasses.dataclass
class ShardReport:
    applied: bool
    reason: str
    planned: List[Tuple[str, str, str, tuple]] = dataclasses.field(default_factory=list)  # (cell, attr, kind, strat)
    unmatched_kinds: Tuple[str, ...] = ()


def _parallel_mode():
    import mindspore as ms

    return str(ms.get_auto_parallel_context("parallel_mode"))


def plan_shard_calls(model, pc):
    """The `.shard` calls `apply_shard_strategies` would make, without making them.

    Walks `model.cells_and_names()` (each cell once, even if shared) and, for every cell declaring
    `shard_ops = {attribute: op kind}`, plans `getattr(cell, attribute).shard(op_strategy(kind, pc))`.
    Returns `(planned, unmatched)`: planned `(cell path, attribute, kind, in_strategy)` tuples, and the op
    kinds of the table that no cell declares (left to sharding propagation). A declared attribute that is not
    a primitive, or a kind the table does not know, is a model bug and raises.
    """
    planned, seen_kinds = [], set()
    for path, cell in model.cells_and_names():
        for attribute, kind in (getattr(cell, "shard_ops", None) or {}).items():
            if not _is_primitive(getattr(cell, attribute, None)):
                raise TypeError(f"{type(cell).__name__} at '{path}' declares shard_ops['{attribute}'] = {kind!r} "
                                f"but its attribute '{attribute}' is not a primitive")
            planned.append((path, attribute, kind, op_strategy(kind, pc)))
            seen_kinds.add(kind)
    unmatched = tuple(kind for kind in OP_KINDS if kind not in seen_kinds)
    return planned, unmatched


def _is_primitive(obj):
    from mindspore.ops import Primitive

    return isinstance(obj, Primitive)


def apply_shard_strategies(model, pc, force=False):
    """Call `.shard` on every primitive the model's cells declare (SEMI_AUTO_PARALLEL / AUTO_PARALLEL, Ascend).

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
    for path, attribute, kind, strategy in planned:
        primitive = getattr(cells[path], attribute)
        out = op_out_strategy(kind, pc)
        if out is None:
            primitive.shard(strategy)
        else:
            primitive.shard(strategy, out)
    logger.info("applied %d shard strategies; left to sharding propagation: %s", len(planned),
                ", ".join(unmatched) or "nothing")
    return ShardReport(True, f"applied under {mode}", planned, unmatched)
