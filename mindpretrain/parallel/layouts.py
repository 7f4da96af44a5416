"""How each weight of the model is split across devices: the one table tensor parallelism is derived from.

The table is the model's `ShardTable` (`mindpretrain.model_spec`, filled by the plugin: DeepSeek-V3's is in
`research/deepseek3/sharding.py`). Every parameter name of the model matches exactly one of its *weight
kinds*. A kind says which dimension of the weight (HF layout, `[out_features, in_features]` for projections)
is split, and over which axis of the device mesh:

- `mp`    model (tensor) parallel, `parallel_config.model_parallel`
- `emp`   tensor parallel inside one routed expert (`moe_config.expert_model_parallel`, default `mp`)
- `vocab` the vocabulary rows of embedding and head: `mp`, or 1 when `vocab_emb_dp` keeps them whole
- `None`  not split

Column-parallel projections split their output rows (each device computes whole heads / a slice of the FFN
width), row-parallel ones split their input columns (partial sums, all-reduced or reduce-scattered under
sequence parallel). Routed experts are additionally distributed over `expert_parallel`: each device holds
`n_routed_experts / ep` of them (the kind's `expert` flag).

`strategies.py` derives the MindSpore `.shard()` tuples of the matmuls from this same table, and the
planner derives per-device memory from it, so the three cannot disagree.
"""
import dataclasses
import math
import re
from typing import Optional, Tuple

from mindpretrain.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Placement of one parameter: its split, the shape each device holds, its stage and replication."""

    name: str
    kind: str
    shape: Tuple[int, ...]
    split: Tuple[int, ...]          # parts per dimension
    shard_shape: Tuple[int, ...]
    expert_parallel: int            # >1: this (routed expert) tensor lives on 1/ep of the stage's devices
    stages: Tuple[int, ...]         # pipeline stages holding a copy
    replicas: int                   # devices of one stage holding the identical shard (optimizer-shard group)
    layer: Optional[int] = None     # layer index (MTP layers after the main ones), None for unlayered weights

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def shard_numel(self):
        return math.prod(self.shard_shape)

    @property
    def numel_per_device(self):
        """Average elements of this parameter on each device of a stage holding it."""
        return self.shard_numel / self.expert_parallel


_INDEX = re.compile(r"\.(\d+)\.")


class _KindMatcher:
    """A shard table's weight-kind regexes, compiled once, with the kind of each name pattern remembered:
    names differing only in layer/expert indices share a kind, so the 46k names of the 671B model match
    a few dozen times."""

    def __init__(self, table):
        self.compiled = tuple((kind, re.compile(pattern + r"$"), split, expert)
                              for kind, pattern, split, expert in table.weight_kinds)
        self.by_pattern = {}

    def entry(self, name):
        pattern_name = _INDEX.sub(".0.", name)
        if pattern_name not in self.by_pattern:
            self.by_pattern[pattern_name] = self._search(pattern_name)
        return self.by_pattern[pattern_name]

    def _search(self, name):
        for kind, pattern, split, expert in self.compiled:
            if pattern.match(name):
                return kind, pattern, split, expert
        raise ConfigError(f"parameter {name!r} matches no weight kind of the model's shard table "
                          "(ShardTable.weight_kinds); add its split there")


_MATCHERS = {}   # id(table) -> (table, matcher); the table is kept so its id is not reused


def _matcher(table):
    found = _MATCHERS.get(id(table))
    if found is None or found[0] is not table:
        found = _MATCHERS[id(table)] = (table, _KindMatcher(table))
    return found[1]


def weight_kind(name, table):
    """`(kind, layer index or None, split symbols, routed expert?)` of a parameter name under `table`."""
    kind, pattern, split, expert = _matcher(table).entry(name)
    layer = pattern.match(name).groupdict().get("layer")
    return kind, (int(layer) if layer is not None else None), split, expert


def axis_size(symbol, parallel_config):
    if symbol is None:
        return 1
    return {"mp": parallel_config.model_parallel,
            "emp": parallel_config.expert_tensor_parallel,
            "vocab": parallel_config.vocab_parallel}[symbol]


def stages_of(kind, layer, placement, table):
    """Pipeline stages holding a weight: its layer's stage; an unlayered embedding kind stage 0 (plus the last
    stage when MTP reads it there), an unlayered head kind the last stage, anything else stage 0."""
    if placement is None:
        return (0,)
    last = placement.pipeline_stage - 1
    if layer is not None:
        return (placement.stage_of_layer(layer),)
    if kind in table.embedding_kinds:
        return tuple(sorted({0, last})) if placement.mtp_depth > 0 else (0,)
    if kind in table.head_kinds:
        return (last,)
    return (0,)


def layout_of(name, shape, parallel_config, placement, table):
    """The `WeightLayout` of parameter `name` (full `shape`) under the layout and pipeline placement (or None)."""
    kind, layer, symbols, expert = weight_kind(name, table)
    shape = tuple(int(item) for item in shape)
    if len(symbols) != len(shape):
        raise ConfigError(f"parameter {name} has shape {shape} but weight kind {kind} describes "
                          f"{len(symbols)} dimensions")
    split = tuple(axis_size(symbol, parallel_config) for symbol in symbols)
    for dim, (size, parts) in enumerate(zip(shape, split)):
        if size % parts:
            raise ConfigError(f"{name} dimension {dim} ({size}) must be divisible by its split "
                              f"{symbols[dim]} ({parts})")
    shard_shape = tuple(size // parts for size, parts in zip(shape, split))
    ep = parallel_config.expert_parallel if expert else 1
    replicas = parallel_config.devices_per_stage // (math.prod(split) * ep)
    return WeightLayout(name=name, kind=kind, shape=shape, split=split, shard_shape=shard_shape,
                        expert_parallel=ep, stages=stages_of(kind, layer, placement, table),
                        replicas=max(replicas, 1), layer=layer)


def weight_layouts(shapes, parallel_config, placement, table):
    """Layouts of every parameter in `shapes` (name -> full shape), in the dict's order; `placement` may be
    None (everything on stage 0)."""
    return [layout_of(name, shape, parallel_config, placement, table) for name, shape in shapes.items()]


def kind_summary(layouts, stage: Optional[int] = None):
    """One representative layout per weight kind (first occurrence), optionally restricted to a stage."""
    seen = {}
    for layout in layouts:
        if stage is not None and stage not in layout.stages:
            continue
        seen.setdefault(layout.kind, layout)
    return list(seen.values())
