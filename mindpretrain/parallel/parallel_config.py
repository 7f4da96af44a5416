"""The run's parallel layout, read from MindFormers' YAML and validated once, before anything is built.

MindFormers users describe the layout in three places of the run YAML, and we read the same keys:

```yaml
parallel_config:                  # MindFormers TransformerOpParallelConfig keys
  data_parallel: 16
  model_parallel: 4
  expert_parallel: 8
  pipeline_stage: 16
  micro_batch_num: 32
  use_seq_parallel: True
  vocab_emb_dp: True
  gradient_aggregation_group: 4
parallel:
  enable_parallel_optimizer: True # optimizer sharding (parallel_config.optimizer_shard is its deprecated alias)
  parallel_optimizer_config:
    optimizer_weight_shard_size: 8  # devices one weight's optimizer state is split over (-1: the whole group)
model:
  model_config:
    offset: [1, 1, ..., -1]       # per-stage layer offset (MindFormers keeps it in model_config)
```

Why validate here rather than let MindSpore fail: on Ascend a layout that does not divide is found
only after graph compilation, which for the 671B model takes most of an hour on 1024 cards. Every
rule below is checked on a laptop by `tools/plan.py` and at the start of training, and each broken
rule raises `ConfigError` naming the key, its value and the rule, e.g.
`num_attention_heads (8) must be divisible by parallel_config.model_parallel (3)`.

The rules and where they come from:
- heads, hidden, intermediate sizes and the (shared) expert FFN width divide by model_parallel, because
  those dimensions are the ones split by tensor parallelism (see `layouts.py`);
- `n_routed_experts % expert_parallel == 0` and `data_parallel % expert_parallel == 0` (MindFormers'
  `_check_moe_config`: the expert-parallel group is carved out of the data-parallel group, so each
  model-parallel slice sees whole expert groups);
- `vocab_size % model_parallel == 0` unless `vocab_emb_dp` keeps embedding and head unsplit;
- with `use_seq_parallel`, `seq_length % model_parallel == 0` (norms and residuals are split on the
  sequence dimension);
- every pipeline stage holds at least one layer, and the offset follows MindFormers' rule (see
  `pipeline.py`); `micro_batch_num >= pipeline_stage` for pipeline training (MindFormers' own check);
- `data_parallel * model_parallel * pipeline_stage == device_num`. MindFormers only requires `<=`,
  leaving the rest of the devices to repeat the same computation; we require equality because a
  silent 2x repetition on a 1024-card run is a mistake, not a layout.
"""
import dataclasses
import difflib
from typing import Optional, Tuple, Union

from mindpretrain.validation import ConfigError, require

# Keys MindFormers' parallel_config accepts that we read but only support at their neutral value.
_NEUTRAL_KEYS = {"context_parallel": 1, "seq_split_num": 1, "context_parallel_algo": "colossalai_cp",
                 "ulysses_degree_in_cp": 1}
# Keys MindFormers accepts that do not change the layout (tuning knobs); accepted and ignored (the start-up
# notice lists them, see mindpretrain/mindformers_keys.py).
_IGNORED_KEYS = ("mem_coeff",)

OffsetSpec = Union[int, Tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism and pipeline settings of one run (MindFormers names)."""

    data_parallel: int = 1
    model_parallel: int = 1
    expert_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    use_seq_parallel: bool = False
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = 4
    optimizer_shard: bool = False
    offset: OffsetSpec = 0
    # Tensor-parallel degree inside each routed expert (MindFormers' moe_config.expert_model_parallel);
    # None means "same as model_parallel".
    expert_model_parallel: Optional[int] = None
    # MindSpore's parallel_optimizer_config.optimizer_weight_shard_size (MindFormers keeps it under
    # parallel.parallel_optimizer_config); -1 splits each weight's optimizer state over its whole group.
    optimizer_weight_shard_size: int = -1

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, parallel_config=None, enable_parallel_optimizer=None, offset=None,
                  expert_model_parallel=None, optimizer_weight_shard_size=None):
        """Build from the YAML `parallel_config` mapping (plus the few keys MindFormers keeps elsewhere)."""
        raw = dict(parallel_config or {})
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            if key in _NEUTRAL_KEYS:
                require(value == _NEUTRAL_KEYS[key], f"parallel_config.{key}", value,
                        f"is not supported by mindpretrain yet; leave it at {_NEUTRAL_KEYS[key]!r}")
                continue
            if key in _IGNORED_KEYS:
                continue
            if key == "recompute":
                raise ConfigError(f"parallel_config.recompute ({value!r}) belongs in recompute_config.recompute")
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(fields), n=2)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"parallel_config.{key} ({value!r}) is not a known parallel_config key{hint}")
            values[key] = value
        if enable_parallel_optimizer is not None:
            legacy = values.get("optimizer_shard")
            require(legacy is None or bool(legacy) == bool(enable_parallel_optimizer),
                    "parallel_config.optimizer_shard", legacy,
                    f"contradicts parallel.enable_parallel_optimizer ({enable_parallel_optimizer!r}); "
                    "set only parallel.enable_parallel_optimizer")
            values["optimizer_shard"] = bool(enable_parallel_optimizer)
        if offset is not None:
            require("offset" not in values, "parallel_config.offset", values.get("offset"),
                    "is also given as model.model_config.offset; set it in one place")
            values["offset"] = offset
        if expert_model_parallel is not None:
            require("expert_model_parallel" not in values, "parallel_config.expert_model_parallel",
                    values.get("expert_model_parallel"),
                    "is also given in moe_config.expert_model_parallel; set it in one place")
            values["expert_model_parallel"] = expert_model_parallel
        if optimizer_weight_shard_size is not None:
            require("optimizer_weight_shard_size" not in values, "parallel_config.optimizer_weight_shard_size",
                    values.get("optimizer_weight_shard_size"),
                    "is also given in parallel.parallel_optimizer_config; set it in one place")
            values["optimizer_weight_shard_size"] = optimizer_weight_shard_size
        config = cls(**values)
        config.check_types()
        return config

    @classmethod
    def from_run_config(cls, run_config):
        """Read the layout from a whole run YAML (a `mindpretrain.config.Config` or plain dict)."""
        run_config = run_config or {}
        parallel = run_config.get("parallel") or {}
        model_config = (run_config.get("model") or {}).get("model_config") or {}
        moe_config = model_config.get("moe_config") or run_config.get("moe_config") or {}
        optimizer_config = parallel.get("parallel_optimizer_config") or {}
        return cls.from_dict(run_config.get("parallel_config") or {},
                             enable_parallel_optimizer=parallel.get("enable_parallel_optimizer"),
                             offset=model_config.get("offset"),
                             expert_model_parallel=moe_config.get("expert_model_parallel"),
                             optimizer_weight_shard_size=optimizer_config.get("optimizer_weight_shard_size"))

    # ------------------------------------------------------------------ derived values
    @property
    def device_num(self):
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def devices_per_stage(self):
        return self.data_parallel * self.model_parallel

    @property
    def expert_tensor_parallel(self):
        """Tensor-parallel degree inside one routed expert."""
        return self.model_parallel if self.expert_model_parallel is None else self.expert_model_parallel

    @property
    def vocab_parallel(self):
        """How many parts embedding/head rows are split into (1 when vocab_emb_dp keeps them whole)."""
        return 1 if self.vocab_emb_dp else self.model_parallel

    @property
    def sequence_parallel(self):
        """How many parts the sequence of norm/residual activations is split into."""
        return self.model_parallel if self.use_seq_parallel else 1

    @property
    def parallel_optimizer_context(self):
        """MindSpore's `set_auto_parallel_context(parallel_optimizer_config=...)` value for optimizer sharding
        (empty when there is nothing to set)."""
        if not self.optimizer_shard or self.optimizer_weight_shard_size == -1:
            return {}
        return {"optimizer_weight_shard_size": self.optimizer_weight_shard_size}

    def to_dict(self):
        data = dataclasses.asdict(self)
        if isinstance(self.offset, tuple):
            data["offset"] = list(self.offset)
        return data

    # ------------------------------------------------------------------ validation
    def check_types(self):
        """Shape of each value (positive ints, bools, offset int or list), independent of the model."""
        for key in ("data_parallel", "model_parallel", "expert_parallel", "pipeline_stage", "micro_batch_num",
                    "gradient_aggregation_group"):
            value = getattr(self, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"parallel_config.{key}", value, "must be a positive integer")
        if self.expert_model_parallel is not None:
            value = self.expert_model_parallel
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    "moe_config.expert_model_parallel", value, "must be a positive integer or null")
            require(self.model_parallel % value == 0, "moe_config.expert_model_parallel", value,
                    f"must divide parallel_config.model_parallel ({self.model_parallel})")
        shard_size = self.optimizer_weight_shard_size
        require(isinstance(shard_size, int) and not isinstance(shard_size, bool)
                and (shard_size == -1 or shard_size >= 1),
                "parallel.parallel_optimizer_config.optimizer_weight_shard_size", shard_size,
                "must be -1 (the whole group) or a positive integer")
        for key in ("use_seq_parallel", "vocab_emb_dp", "optimizer_shard"):
            require(isinstance(getattr(self, key), bool), f"parallel_config.{key}", getattr(self, key),
                    "must be True or False")
        offset = self.offset
        if isinstance(offset, list):
            object.__setattr__(self, "offset", tuple(offset))
            offset = self.offset
        valid = (isinstance(offset, int) and not isinstance(offset, bool)) or (
            isinstance(offset, tuple) and all(isinstance(item, int) and not isinstance(item, bool)
                                              for item in offset))
        require(valid, "offset", offset, "must be an integer or a list of integers, one per pipeline stage")

    def validate(self, model_config, device_num=None):
        """Check this layout against a model config (DeepseekV3Config attribute names) and device count.

        Returns the pipeline placement, so callers that go on to plan need not recompute it.
        """
        from mindpretrain.parallel.pipeline import place_layers  # pipeline imports this module

        self.check_types()
        mp, ep, dp = self.model_parallel, self.expert_parallel, self.data_parallel
        emp = self.expert_tensor_parallel

        def divisible(attribute, by, by_name):
            value = getattr(model_config, attribute, None)
            if value is None:
                return
            require(value % by == 0, attribute, value, f"must be divisible by {by_name} ({by})")

        divisible("num_attention_heads", mp, "parallel_config.model_parallel")
        divisible("hidden_size", mp, "parallel_config.model_parallel")
        if _has_dense_layers(model_config):
            divisible("intermediate_size", mp, "parallel_config.model_parallel")
        if _num_moe_layers(model_config):
            n_shared = getattr(model_config, "n_shared_experts", 0) or 0
            moe_width = getattr(model_config, "moe_intermediate_size")
            require(moe_width % emp == 0, "moe_intermediate_size", moe_width,
                    f"must be divisible by the expert tensor-parallel degree ({emp})")
            if n_shared:
                require(moe_width * n_shared % mp == 0, "moe_intermediate_size * n_shared_experts",
                        moe_width * n_shared, f"must be divisible by parallel_config.model_parallel ({mp})")
            divisible("n_routed_experts", ep, "parallel_config.expert_parallel")
            require(dp % ep == 0, "parallel_config.expert_parallel", ep,
                    f"must divide parallel_config.data_parallel ({dp}): the expert-parallel group is carved "
                    "out of the data-parallel group (MindFormers' MoE rule)")
        else:
            require(ep == 1, "parallel_config.expert_parallel", ep, "must be 1 for a model without MoE layers")
        if not self.vocab_emb_dp:
            vocab = getattr(model_config, "vocab_size")
            require(vocab % mp == 0, "vocab_size", vocab,
                    f"must be divisible by parallel_config.model_parallel ({mp}) unless "
                    "parallel_config.vocab_emb_dp is True")
        if self.use_seq_parallel:
            seq = getattr(model_config, "seq_length", None)
            if seq is not None:
                require(seq % mp == 0, "seq_length", seq,
                        f"must be divisible by parallel_config.model_parallel ({mp}) when "
                        "parallel_config.use_seq_parallel is True")
        if self.pipeline_stage > 1:
            require(self.micro_batch_num >= self.pipeline_stage, "parallel_config.micro_batch_num",
                    self.micro_batch_num,
                    f"must be >= parallel_config.pipeline_stage ({self.pipeline_stage}) for pipeline training")
        if device_num is not None:
            require(self.device_num == device_num, "parallel_config",
                    f"data_parallel {dp} * model_parallel {mp} * pipeline_stage {self.pipeline_stage} "
                    f"= {self.device_num}", f"must equal the device count ({device_num})")
        return place_layers(model_config, self)


def _num_layers(model_config):
    return getattr(model_config, "num_hidden_layers")


def _has_dense_layers(model_config):
    return min(getattr(model_config, "first_k_dense_replace", 0) or 0, _num_layers(model_config)) > 0 or \
        not getattr(model_config, "n_routed_experts", 0)


def _num_moe_layers(model_config):
    if not getattr(model_config, "n_routed_experts", 0):
        return 0
    return max(_num_layers(model_config) - (getattr(model_config, "first_k_dense_replace", 0) or 0), 0)
