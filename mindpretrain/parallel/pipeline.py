"""Which transformer layers live on which pipeline stage, and how much of a step the pipeline idles.

Placement follows MindFormers (`mindformers/models/utils.py: LayerSetting`, as used by its DeepSeek-V3
model with `num_layers + mtp_depth`):

- The multi-token-prediction blocks count as layers: they are numbered after the decoder layers
  (`num_hidden_layers .. num_hidden_layers + D - 1`, the HF checkpoint's numbering too), so the
  placement distributes `total = num_hidden_layers + num_nextn_predict_layers` layers.
- Stage `i` holds `total // pipeline_stage + offset[i]` consecutive layers. A list `offset` has one
  entry per stage and must sum to `total % pipeline_stage`; an integer offset applies to every stage
  (so `offset * pipeline_stage` must equal the remainder). Example, the 671B run: 61 + 1 MTP = 62
  layers over 16 stages, base 3, offset `[1]*15 + [-1]` → fifteen stages of 4 decoder layers and a
  last stage with decoder layer 60 plus the MTP block (it also holds the final norm and the head).
- `offset` is read from `parallel_config.offset` or, as MindFormers users write it,
  `model.model_config.offset` (one of the two).
- Default (`offset: 0` while the layers do not divide): every stage takes the base count and the last
  stage takes the remainder as well. MindFormers rejects this case and asks for an explicit offset;
  we accept it so small experiments run, and `tools/plan.py` reports the imbalance and suggests an
  offset list that spreads the remainder.
- The MTP blocks must sit on the last stage, next to the output head they share; the embedding is on
  stage 0 (and a copy of it on the last stage when MTP needs the embedding of the token ahead).

Bubble: with the 1F1B schedule each stage idles `pp - 1` micro-batch slots out of `m + pp - 1`, so the
bubble fraction is `(pp - 1) / (m + pp - 1)` (Narayanan et al., 2021).
"""
import dataclasses
import re
from typing import Tuple

from mindpretrain.validation import require


@dataclasses.dataclass(frozen=True)
class StagePlacement:
    stage: int
    layer_ids: Tuple[int, ...]          # global ids: decoder layers first, then MTP blocks
    decoder_layers: Tuple[int, ...]
    mtp_layers: Tuple[int, ...]         # indices 0..D-1 of the MTP blocks on this stage
    has_embedding: bool
    has_head: bool                      # final norm + lm_head

    @property
    def num_layers(self):
        return len(self.layer_ids)


@dataclasses.dataclass(frozen=True)
class PipelinePlacement:
    num_hidden_layers: int
    mtp_depth: int
    pipeline_stage: int
    micro_batch_num: int
    layers_per_stage: Tuple[int, ...]
    stages: Tuple[StagePlacement, ...]
    explicit_offset: bool

    def stage_of_layer(self, layer_id):
        for placement in self.stages:
            if layer_id in placement.layer_ids:
                return placement.stage
        raise IndexError(f"layer {layer_id} is not placed (total {self.num_hidden_layers + self.mtp_depth})")

    @property
    def bubble_fraction(self):
        return bubble_fraction(self.pipeline_stage, self.micro_batch_num)

    @property
    def balanced(self):
        return max(self.layers_per_stage) - min(self.layers_per_stage) <= 1

    def suggested_offset(self):
        """An offset list spreading the remainder one layer per stage from the first stage on, while
        keeping the last stage light (it also holds the head, and MTP when present)."""
        return suggest_offset(self.num_hidden_layers + self.mtp_depth, self.pipeline_stage, self.mtp_depth)


def bubble_fraction(pipeline_stage, micro_batch_num):
    """Idle share of a 1F1B pipeline step: (pp - 1) / (m + pp - 1)."""
    if pipeline_stage <= 1:
        return 0.0
    return (pipeline_stage - 1) / (micro_batch_num + pipeline_stage - 1)


def layers_per_stage(total_layers, pipeline_stage, offset=0):
    """Layer counts per stage under MindFormers' offset rule (see module docstring).

    Returns `(counts, explicit)`; raises ConfigError naming `offset` when the rule is broken.
    """
    pp = pipeline_stage
    base, remainder = divmod(total_layers, pp)
    if isinstance(offset, (list, tuple)):
        offsets = list(offset)
        require(len(offsets) == pp, "offset", list(offsets),
                f"must have one entry per pipeline stage (pipeline_stage = {pp})")
        require(sum(offsets) == remainder, "offset", list(offsets),
                f"must sum to the remainder of {total_layers} layers (decoder + MTP) over {pp} stages "
                f"({total_layers} % {pp} = {remainder}); it sums to {sum(offsets)}")
        return [base + item for item in offsets], True
    if offset == 0:
        counts = [base] * pp
        counts[-1] += remainder
        return counts, False
    require(offset * pp == remainder, "offset", offset,
            f"as an integer is added to every one of the {pp} stages, so offset * pipeline_stage must equal "
            f"the remainder {total_layers} % {pp} = {remainder}; give a list instead")
    return [base + offset] * pp, True


def place_layers(model_config, parallel_config):
    """Place decoder layers and MTP blocks of `model_config` over `parallel_config.pipeline_stage` stages."""
    num_layers = getattr(model_config, "num_hidden_layers")
    mtp_depth = getattr(model_config, "num_nextn_predict_layers", 0) or 0
    pp = parallel_config.pipeline_stage
    total = num_layers + mtp_depth
    require(total >= pp, "parallel_config.pipeline_stage", pp,
            f"must not exceed the number of layers (num_hidden_layers {num_layers} + MTP {mtp_depth} = {total})")
    counts, explicit = layers_per_stage(total, pp, parallel_config.offset)
    for stage, count in enumerate(counts):
        require(count >= 1, "offset", _offset_repr(parallel_config.offset),
                f"leaves pipeline stage {stage} with {count} layers; every stage needs at least one "
                f"(layers per stage would be {counts})")
    require(counts[-1] >= mtp_depth, "offset", _offset_repr(parallel_config.offset),
            f"leaves the last stage {counts[-1]} layers but the {mtp_depth} MTP block(s) must sit on the last "
            f"stage with the output head (layers per stage would be {counts})")
    stages, start = [], 0
    for stage, count in enumerate(counts):
        ids = tuple(range(start, start + count))
        start += count
        stages.append(StagePlacement(
            stage=stage, layer_ids=ids,
            decoder_layers=tuple(i for i in ids if i < num_layers),
            mtp_layers=tuple(i - num_layers for i in ids if i >= num_layers),
            has_embedding=stage == 0 or (stage == pp - 1 and mtp_depth > 0),
            has_head=stage == pp - 1))
    return PipelinePlacement(num_hidden_layers=num_layers, mtp_depth=mtp_depth, pipeline_stage=pp,
                             micro_batch_num=parallel_config.micro_batch_num,
                             layers_per_stage=tuple(counts), stages=tuple(stages), explicit_offset=explicit)


def suggest_offset(total_layers, pipeline_stage, mtp_depth=0):
    """Spread `total % pp` extra layers over the first stages; if the last stage would end up as
    heavy as the others while also carrying the head, move one of its layers forward."""
    pp = pipeline_stage
    base, remainder = divmod(total_layers, pp)
    offsets = [1 if stage < remainder else 0 for stage in range(pp)]
    if pp > 1 and offsets[-1] == 0 and remainder < pp - 1 and base - 1 >= max(mtp_depth, 1):
        # the head-carrying last stage gives one layer to the first stage without an extra one
        offsets[-1] = -1
        offsets[remainder] += 1
    return offsets


def _offset_repr(offset):
    return list(offset) if isinstance(offset, tuple) else offset


_LAYER_PATH = re.compile(r"(?:.*\.)?layers\.(\d+)$")
_LAYER_EMBEDDING_PATH = re.compile(r"(?:.*\.)?layers\.(\d+)\.embed_tokens$")


def pipeline_stage_of_cells(model, placement):
    """{cell path: stage} for the cells MindSpore's pipeline parallelism needs a `pipeline_stage` on.

    Cell paths equal the HF parameter-name prefixes (`model.layers.7`, `model.embed_tokens`, `model.norm`,
    `lm_head`): decoder layers and MTP blocks go to the stage `placement` gives them, the embedding to
    stage 0, the final norm and the head to the last stage. An MTP block's own embedding cell
    (`model.layers.{L+i}.embed_tokens`, holding the main embedding Parameter) goes with its block.
    """
    last = placement.pipeline_stage - 1
    stages = {}
    for path, _ in model.cells_and_names():
        match = _LAYER_PATH.match(path) or _LAYER_EMBEDDING_PATH.match(path)
        if match:
            stages[path] = placement.stage_of_layer(int(match.group(1)))
        elif path.endswith("embed_tokens") and "layers." not in path:
            stages[path] = 0
        elif path in ("model.norm", "lm_head"):
            stages[path] = last
    return stages


def assign_pipeline_stages(model, placement):
    """Set `cell.pipeline_stage` on the model's layers, embedding, final norm and head (Ascend pipeline runs).

    The MTP blocks on the last stage read the embedding that lives on stage 0: each block has its own
    embedding cell holding the same Parameter (as MindFormers does), placed with the block, so MindSpore sees
    one weight shared between stage 0 and the last stage. A tied head (`lm_head` holding the embedding
    Parameter) is shared the same way.
    """
    cells = dict(model.cells_and_names())
    stages = pipeline_stage_of_cells(model, placement)
    if hasattr(model, "merge_embedding_lookups"):      # the MTP blocks then look up on their own stage
        model.merge_embedding_lookups = False
    for path, stage in stages.items():
        cells[path].pipeline_stage = stage
    return stages


def layers_per_stage_count(placement, counts, key):
    """Per-stage layer counts (MindFormers' `recompute: [n0, n1, ...]`) -> the set of global layer ids they name.

    As MindFormers' `LayerSetting` does, stage i contributes its FIRST `counts[i]` layers (clamped to the layers
    it holds); `True` means all of the stage's layers and `False` none.
    """
    pp = placement.pipeline_stage
    require(len(counts) == pp, key, list(counts),
            f"as a per-stage list must have one entry per pipeline stage (pipeline_stage = {pp})")
    chosen = set()
    for stage, count in zip(placement.stages, counts):
        require(isinstance(count, int) and (isinstance(count, bool) or count >= 0), key, list(counts),
                "entries must be True, False or a number of layers >= 0 (one per pipeline stage)")
        if isinstance(count, bool):
            count = stage.num_layers if count else 0
        chosen.update(stage.layer_ids[:count])
    return chosen
