"""How each weight of the model is split across devices: the one table tensor parallelism is derived from.

Every parameter name of the model (HF checkpoint names, from `research/deepseek3/weight_mapping.py`)
matches exactly one *weight kind* below. A kind says which dimension of the weight (HF layout,
`[out_features, in_features]` for projections) is split, and over which axis of the device mesh:

- `mp`    model (tensor) parallel, `parallel_config.model_parallel`
- `emp`   tensor parallel inside one routed expert (`moe_config.expert_model_parallel`, default `mp`)
- `vocab` the vocabulary rows of embedding and head: `mp`, or 1 when `vocab_emb_dp` keeps them whole

Column-parallel projections split their output rows (`q_b_proj`, `kv_b_proj`, `gate_proj`, `up_proj`:
each device computes whole heads / a slice of the FFN width), row-parallel ones split their input
columns (`o_proj`, `down_proj`: partial sums, all-reduced or reduce-scattered under sequence parallel).
The low-rank down projections (`q_a_proj`, `kv_a_proj_with_mqa`), norms, the router and MTP's
`eh_proj` are small and stay whole on every device, as in MindFormers' DeepSeek-V3. Routed experts
are additionally distributed over `expert_parallel`: each device holds `n_routed_experts / ep` of
them (the `expert` flag below).

`strategies.py` derives the MindSpore `.shard()` tuples of the matmuls from this same table, and the
planner derives per-device memory from it, so the three cannot disagree.
"""
import dataclasses
import functools
import math
import re
from typing import Optional, Tuple

from mindpretrain.config import ConfigError

from research.deepseek3.sharding import WEIGHT_KINDS  # noqa: E402  (transitional: moves to the model spec)

_COMPILED = tuple((kind, re.compile(pattern + r"$"), split, expert) for kind, pattern, split, expert in WEIGHT_KINDS)
KIND_SPLITS = {kind: split for kind, _, split, _ in WEIGHT_KINDS}


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


def weight_kind(name):
    """`(kind, layer index or None, split symbols, routed expert?)` for a parameter name."""
    layer_match = re.match(r"model\.layers\.(\d+)\.", name)
    kind, split, expert = _kind_of_pattern(_INDEX.sub(".0.", name))
    return kind, (int(layer_match.group(1)) if layer_match else None), split, expert


@functools.lru_cache(maxsize=None)
def _kind_of_pattern(name):
    # names differing only in layer/expert indices share a kind: match once per pattern
    for kind, pattern, split, expert in _COMPILED:
        if pattern.match(name):
            return kind, split, expert
    raise ConfigError(f"parameter {name!r} matches no weight kind of mindpretrain.parallel.layouts.WEIGHT_KINDS; "
                      "add its split there")


def axis_size(symbol, parallel_config):
    if symbol is None:
        return 1
    return {"mp": parallel_config.model_parallel,
            "emp": parallel_config.expert_tensor_parallel,
            "vocab": parallel_config.vocab_parallel}[symbol]


def stages_of(name, kind, layer, placement):
    """Pipeline stages holding parameter `name` (embedding: stage 0, plus the last stage when MTP needs it)."""
    if placement is None:
        return (0,)
    last = placement.pipeline_stage - 1
    if kind == "embedding" and layer is None:
        return tuple(sorted({0, last})) if placement.mtp_depth > 0 else (0,)
    if layer is not None:
        return (placement.stage_of_layer(layer),)
    if kind in ("final_norm", "lm_head"):
        return (last,)
    return (0,)


def layout_of(name, shape, parallel_config, placement=None):
    kind, layer, symbols, expert = weight_kind(name)
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
                        expert_parallel=ep, stages=stages_of(name, kind, layer, placement),
                        replicas=max(replicas, 1))


def weight_layouts(shapes, parallel_config, placement=None):
    """Layouts of every parameter in `shapes` (name -> full shape), in the dict's order."""
    return [layout_of(name, shape, parallel_config, placement) for name, shape in shapes.items()]


def model_parameter_shapes(model_cfg):
    """Name -> shape of every parameter, from the model's one mapping table (weight_mapping.py)."""
    from research.deepseek3.weight_mapping import hf_parameter_shapes

    return hf_parameter_shapes(model_cfg)


def kind_summary(layouts, stage: Optional[int] = None):
    """One representative layout per weight kind (first occurrence), optionally restricted to a stage."""
    seen = {}
    for layout in layouts:
        if stage is not None and stage not in layout.stages:
            continue
        seen.setdefault(layout.kind, layout)
    return list(seen.values())
