"""MindSpore `.shard()` strategies for every op kind of a model, derived from its shard table.

A strategy says, for each input of a primitive, how many parts each dimension is cut into; MindSpore
(SEMI_AUTO_PARALLEL, Ascend) inserts the collectives that make the cut consistent. The model's `ShardTable`
(`mindpretrain.model_spec`; DeepSeek-V3's is `research/deepseek3/sharding.py`) writes them in mesh symbols,
resolved here against a `ParallelConfig`:

- `dp` data parallel, `mp` model parallel, `sp` sequence split of norm/residual activations (`mp` with
  `use_seq_parallel`, else 1), `ep` expert parallel, `emp` tensor parallel inside an expert,
  `dp_ep` the data-parallel replicas left inside an expert group (`dp / ep`), `vocab` the vocabulary
  split (`mp`, or 1 with `vocab_emb_dp`), products such as `dp*sp`, a product over a divisor such as
  `dp*mp/ep`, and `None` (not split). Layout op kinds (`table.layout_ops`) name a device matrix of such sizes
  and say per dimension which of its axes splits it (`op_layout`; MindSpore's `Layout`).

The projections' strategies are not written by hand: for the table's `matmul_ops`, `MatMul(x, W^T)` with `W`
split as its weight kind says takes `x` split on tokens by `dp` (or `dp*sp` for small replicated projections
that read sequence-parallel activations, as MindFormers does) and on its contracted dimension exactly like
`W`'s input dimension. Every other op kind (`op_symbols`) is written out in the table, next to the tensor
layout it assumes.

Which primitive has which kind is declared by the model, not guessed here: a cell that computes through
primitives held as attributes exposes `shard_ops = {attribute name: op kind}`, and `apply_shard_strategies`
walks the cells and shards exactly those primitives. Ops that no cell declares are left to sharding
propagation and listed in the report (`unmatched_kinds`).

On CPU nothing is applied: `op_strategies(parallel_config, table)` is computed and tested, and
`apply_shard_strategies` returns a report saying it skipped because the parallel mode is not (semi-)auto
parallel (`force=True` records the strategies on the primitives anyway; stand-alone execution ignores them).
"""
import dataclasses
import math
from typing import List, Tuple

from mindpretrain.utils.logging import get_logger

logger = get_logger("parallel.strategies")


def symbol_sizes(parallel_config):
    """Mesh symbol -> number of parts under `parallel_config`."""
    return {"dp": parallel_config.data_parallel, "mp": parallel_config.model_parallel,
            "ep": parallel_config.expert_parallel, "emp": parallel_config.expert_tensor_parallel,
            "sp": parallel_config.sequence_parallel, "vocab": parallel_config.vocab_parallel,
            "dp_ep": parallel_config.data_parallel // parallel_config.expert_parallel}


def resolve(symbol, sizes):
    """Parts of a symbol: None -> 1, "dp" -> its size, "dp*mp" a product, "dp*mp/ep" a product over a divisor."""
    if symbol is None:
        return 1
    product, _, divisor = symbol.partition("/")
    parts = math.prod(sizes[part] for part in product.split("*"))
    return parts // sizes[divisor] if divisor else parts


@dataclasses.dataclass(frozen=True)
class LayoutStrategy:
    """A layout-sharded op kind resolved for a ParallelConfig: the device matrix (slowest axis first), its axis
    names, and each input's / output's axis name per dimension (None = not split)."""

    device_matrix: Tuple[int, ...]
    axis_names: Tuple[str, ...]
    inputs: tuple
    outputs: tuple

    def input_parts(self, index):
        """Parts each dimension of input `index` is cut into (what a plain strategy tuple would say)."""
        size = dict(zip(self.axis_names, self.device_matrix))
        return tuple(math.prod(size[name] for name in (axes if isinstance(axes, tuple) else (axes,)))
                     if axes is not None else 1 for axes in self.inputs[index])

    def shard_arguments(self):
        """`in_strategy` and `out_strategy` of MindSpore Layouts for `primitive.shard`."""
        from mindspore.parallel import Layout

        layout = Layout(self.device_matrix, self.axis_names)

        def tensor(axes):
            return layout(*("None" if names is None else names for names in axes))

        return tuple(tensor(axes) for axes in self.inputs), tuple(tensor(axes) for axes in self.outputs)


def op_layout(kind, parallel_config, table):
    """The `LayoutStrategy` of a layout op kind of `table` (`table.layout_ops[kind]`)."""
    mesh, inputs, outputs = table.layout_ops[kind]
    sizes = symbol_sizes(parallel_config)
    return LayoutStrategy(tuple(resolve(symbol, sizes) for _, symbol in mesh), tuple(name for name, _ in mesh),
                          inputs, outputs)


def matmul_symbols(kind, parallel_config, table):
    """(x symbols, W symbols) of `x [T, in] @ W[out, in]^T` for a weight kind of `table`."""
    out_split, in_split = table.kind_splits[kind]
    if out_split is None and in_split is None:
        # a replicated weight reads sequence-parallel input
        tokens = "dp*sp" if parallel_config.use_seq_parallel else "dp"
    else:
        tokens = "dp"
    return ((tokens, in_split), (out_split, in_split))


def op_strategy_symbols(kind, parallel_config, table):
    if kind in table.op_symbols:
        return table.op_symbols[kind]
    if kind in table.matmul_ops:
        return matmul_symbols(kind, parallel_config, table)
    raise KeyError(f"unknown op kind {kind!r}; known: {', '.join(table.op_kinds)}")


def op_strategy(kind, parallel_config, table):
    """The `.shard()` in_strategy tuple of op `kind` of `table` under `parallel_config` (a `LayoutStrategy` for
    a layout op kind)."""
    if kind in table.layout_ops:
        return op_layout(kind, parallel_config, table)
    sizes = symbol_sizes(parallel_config)
    return tuple(tuple(resolve(symbol, sizes) for symbol in entry)
                 for entry in op_strategy_symbols(kind, parallel_config, table))


def op_strategies(parallel_config, table):
    """Every op kind of `table` -> its in_strategy tuple."""
    return {kind: op_strategy(kind, parallel_config, table) for kind in table.op_kinds}


def op_out_strategy(kind, parallel_config, table):
    """out_strategy for row-parallel projections under sequence parallelism, else None.

    A row-parallel matmul (its weight split on the input dimension by `mp`) produces partial sums over `mp`;
    asking for the output split `(dp*mp, 1)` on tokens turns the all-reduce into a reduce-scatter that leaves
    the result sequence-parallel for the following norm/residual (MindFormers does the same).
    """
    mp = parallel_config.model_parallel
    if kind in table.matmul_ops and parallel_config.use_seq_parallel and mp > 1 and \
            table.kind_splits[kind][1] == "mp":
        return ((parallel_config.data_parallel * mp, 1),)
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


def plan_shard_calls(model, parallel_config, table):
    """The `.shard` calls `apply_shard_strategies` would make, without making them.

    Walks `model.cells_and_names()` (each cell once, even if shared) and, for every cell declaring
    `shard_ops = {attribute: op kind}`, plans `getattr(cell, attribute).shard(op_strategy(kind, ...))`.
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
            planned.append((path, attribute, kind, op_strategy(kind, parallel_config, table)))
            seen_kinds.add(kind)
    unmatched = tuple(kind for kind in table.op_kinds if kind not in seen_kinds)
    return planned, unmatched


def _is_primitive(obj):
    from mindspore.ops import Primitive

    return isinstance(obj, Primitive)


def apply_shard_strategies(model, parallel_config, table, force=False):
    """Call `.shard` on every primitive the model's cells declare (SEMI_AUTO_PARALLEL / AUTO_PARALLEL, Ascend).

    In any other parallel mode (STAND_ALONE on CPU, DATA_PARALLEL) it changes nothing and returns a
    report with `applied=False` and the reason, so callers can log it instead of guessing.
    """
    planned, unmatched = plan_shard_calls(model, parallel_config, table)
    mode = _parallel_mode()
    if mode not in ("semi_auto_parallel", "auto_parallel") and not force:
        reason = (f"parallel_mode is {mode}: shard strategies only take effect under semi_auto_parallel/"
                  "auto_parallel (Ascend); computed, not applied")
        logger.info("apply_shard_strategies skipped: %s (%d calls planned)", reason, len(planned))
        return ShardReport(False, reason, planned, unmatched)
    cells = dict(model.cells_and_names())
    for path, attribute, kind, strategy in planned:
        primitive = getattr(cells[path], attribute)
        out = op_out_strategy(kind, parallel_config, table)
        if isinstance(strategy, LayoutStrategy):
            layouts_in, layouts_out = strategy.shard_arguments()
            primitive.shard(in_strategy=layouts_in, out_strategy=layouts_out)
        elif out is None:
            primitive.shard(strategy)
        else:
            primitive.shard(strategy, out)
    logger.info("applied %d shard strategies; left to sharding propagation: %s", len(planned),
                ", ".join(unmatched) or "nothing")
    return ShardReport(True, f"applied under {mode}", planned, unmatched)
