"""`DeepseekV3Config`: the one description of a DeepSeek-V3 model, validated once when it is built.

Attribute names are those of the HuggingFace `config.json` of the DeepSeek-V3 release, so a config
read with `from_hf(dir)` and one written by `to_hf_dict()` need no translation. MindFormers users
keep their YAML: its names (`num_layers`, `num_heads`, `moe_config: {expert_num, ...}`, `mtp_depth`,
`scaling_factor`, ...) are translated through `_ALIASES`, the single table of alternative names.

Every inconsistency is a `ConfigError` naming the key, the value and the rule, raised at
construction — before any weight is allocated. `check_device(device_target)` adds the one rule that
depends on where the run happens (bfloat16 kernels do not exist on MindSpore's CPU backend).
"""
import copy
import difflib
import json
import os

from mindpretrain.config import ConfigError, require
from mindpretrain.registry import register
from mindpretrain.utils.logging import get_logger

logger = get_logger("deepseek3.config")

DTYPE_NAMES = ("float32", "float16", "bfloat16")
RECOMPUTE_MODES = ("none", "full", "selective")

# Canonical fields and defaults (the DeepSeek-V3 671B release, plus training fields).
_DEFAULTS = {
    # --- HF config.json names ---
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": None,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rope_interleave": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
    # --- training fields (not in config.json) ---
    "seq_length": 4096,
    "compute_dtype": "bfloat16",
    "param_init_type": "float32",
    "layernorm_compute_type": "float32",
    "softmax_compute_type": "float32",
    "mtp_loss_factor": 0.3,
    "topk_bias_update_rate": 0.001,
    "seq_balance_loss_alpha": 0.0001,
    "recompute": False,
    "moe_dispatch_block_size": None,
    # None: the device's default (grouped_matmul on Ascend, block_sparse elsewhere); see moe.py
    "moe_dispatch": None,
    "offset": 0,  # pipeline layer offset (MindFormers `offset`), read by the parallel layout
}

HF_FIELDS = tuple(name for name in _DEFAULTS if name not in (
    "seq_length", "compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type",
    "mtp_loss_factor", "topk_bias_update_rate", "seq_balance_loss_alpha", "recompute",
    "moe_dispatch_block_size", "moe_dispatch", "offset"))

# The one table of alternative names: (where it is found, canonical name). `moe_config.x` means the key x inside
# a nested `moe_config` mapping (MindFormers keeps MoE settings there).
_ALIASES = (
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("n_kv_heads", "num_key_value_heads"),
    ("theta", "rope_theta"),
    ("init_method_std", "initializer_range"),
    ("mtp_depth", "num_nextn_predict_layers"),
    ("num_mtp_layers", "num_nextn_predict_layers"),         # transformers 5 name
    ("num_local_experts", "n_routed_experts"),              # transformers attribute_map
    ("scaling_factor", "rope_scaling"),                     # MindFormers YaRN dict (with extend_method: YARN)
    ("rope_parameters", "rope_scaling"),                    # transformers 5 config.json
    ("moe_config.expert_num", "n_routed_experts"),
    ("moe_config.num_experts_chosen", "num_experts_per_tok"),
    ("moe_config.shared_expert_num", "n_shared_experts"),
    ("moe_config.routed_scaling_factor", "routed_scaling_factor"),
    ("moe_config.first_k_dense_replace", "first_k_dense_replace"),
    ("moe_config.moe_intermediate_size", "moe_intermediate_size"),
    ("moe_config.n_group", "n_group"),
    ("moe_config.topk_group", "topk_group"),
    ("moe_config.topk_bias_update_rate", "topk_bias_update_rate"),
    ("moe_config.norm_topk_prob", "norm_topk_prob"),
    ("moe_config.aux_loss_factors", "seq_balance_loss_alpha"),   # MindFormers list form, first entry
    ("moe_config.aux_loss_factor", "seq_balance_loss_alpha"),
)

# MindFormers / HF keys that describe kernels, inference or bookkeeping, not the model being trained.
_IGNORED = frozenset((
    "batch_size", "multiple_of", "ffn_dim_multiplier", "ignore_token_id", "rotary_dtype", "router_dense_type",
    "use_past", "use_flash_attention", "use_fused_swiglu", "use_fused_rope", "input_sliced_sig",
    "checkpoint_name_or_path", "return_extra_loss", "qkv_concat", "ffn_concat", "qkv_has_bias", "block_size",
    "num_blocks", "repetition_penalty", "max_decode_length", "top_k", "top_p", "do_sample", "is_dynamic",
    "auto_map", "auto_register", "fine_grain_interleave", "pp_interleave_num", "extend_method",
    "parallel_config", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "quantization_config", "pretraining_tp", "output_router_logits", "ep_size", "aux_loss_alpha", "seq_aux",
    "topk_method", "scoring_func", "moe_layer_freq", "head_dim", "qk_head_dim", "_name_or_path", "type",
))
_IGNORED_MOE = frozenset((
    "expert_group_size", "capacity_factor", "routing_policy", "balance_via_topk_bias", "use_fused_ops_topkrouter",
    "aux_loss_types", "expert_model_parallel", "use_gating_sigmoid", "callback_moe_droprate", "use_gmm",
    "use_fused_ops_permute", "enable_gmm_safe_tokens", "enable_sdrop", "group_wise_a2a", "z_loss_factor",
    "num_experts_chosen_per_group", "enable_deredundency", "npu_nums_per_device", "use_allgather_dispatcher",
))
# How routed tokens reach their experts (research/deepseek3/moe.py explains both).
MOE_DISPATCHES = ("block_sparse", "grouped_matmul")
# Values of HF config.json keys this implementation relies on; anything else is a different model.
_REQUIRED_HF_VALUES = {"scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",), "moe_layer_freq": (1,)}

_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def _normalise_dtype(key, value):
    if hasattr(value, "__name__") or not isinstance(value, str):   # an mstype passed programmatically
        value = str(value)
    name = value.lower().replace("mstype.", "")
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name)
    require(name in DTYPE_NAMES, key, value, f"must be one of {', '.join(DTYPE_NAMES)}")
    return name


def _normalise_rope_scaling(value, key="rope_scaling"):
    """None or a YaRN dict with every key present (defaults filled); any other kind is refused."""
    if value is None or value == "None":
        return None
    require(isinstance(value, dict), key, value, "must be a mapping (YaRN parameters) or null")
    scaling = dict(value)
    kinds = {scaling.pop("type", None), scaling.pop("rope_type", None)} - {None}
    require(len(kinds) <= 1, f"{key}.type", sorted(kinds), "and rope_type must agree")
    kind = kinds.pop() if kinds else None
    scaling.pop("rope_theta", None)        # transformers 5 keeps rope_theta inside rope_parameters
    scaling.pop("truncate", None)
    if kind in (None, "default") and "factor" not in scaling:
        return None
    require(kind in (None, "yarn", "YARN"), f"{key}.type", kind, "must be 'yarn' (the only RoPE scaling DeepSeek-V3 "
            "uses); remove rope_scaling for plain RoPE")
    unknown = sorted(set(scaling) - set(_YARN_KEYS) - {"attention_factor"})
    require(not unknown, key, unknown, f"has unknown keys; YaRN takes {', '.join(_YARN_KEYS)}")
    require(scaling.get("attention_factor") is None, f"{key}.attention_factor", scaling.get("attention_factor"),
            "is not supported: DeepSeek-V3 derives it from mscale/mscale_all_dim")
    scaling.pop("attention_factor", None)
    for name in ("factor", "original_max_position_embeddings"):
        require(name in scaling, f"{key}.{name}", None, "is required for YaRN")
    for name, default in _YARN_DEFAULTS.items():
        if scaling.get(name) is None:
            scaling[name] = default
    require(isinstance(scaling["factor"], (int, float)) and scaling["factor"] >= 1.0, f"{key}.factor",
            scaling["factor"], "must be a number >= 1")
    require(isinstance(scaling["original_max_position_embeddings"], int)
            and scaling["original_max_position_embeddings"] > 0, f"{key}.original_max_position_embeddings",
            scaling["original_max_position_embeddings"], "must be a positive integer")
    require(scaling["beta_fast"] > scaling["beta_slow"] > 0, f"{key}.beta_fast",
            scaling["beta_fast"], f"must be greater than beta_slow ({scaling['beta_slow']}) > 0")
    for name in ("mscale", "mscale_all_dim"):
        require(isinstance(scaling[name], (int, float)) and scaling[name] >= 0, f"{key}.{name}", scaling[name],
                "must be a number >= 0")
    return {"type": "yarn", **{name: scaling[name] for name in _YARN_KEYS}}


def _normalise_recompute(value, num_layers):
    """-> tuple of per-layer modes ('none'|'full'|'selective'), main layers then MTP layers."""
    def mode(item, key):
        if item is True:
            return "full"
        if item in (False, None, 0):
            return "none"
        require(isinstance(item, str) and item.lower() in RECOMPUTE_MODES, key, item,
                f"must be a bool or one of {', '.join(RECOMPUTE_MODES)}")
        return item.lower()
    if isinstance(value, (list, tuple)):
        require(len(value) == num_layers, "recompute", value,
                f"as a per-layer list must have one entry per layer ({num_layers}, main + MTP)")
        return tuple(mode(item, f"recompute[{index}]") for index, item in enumerate(value))
    return (mode(value, "recompute"),) * num_layers


@register("config")
class DeepseekV3Config:
    """DeepSeek-V3 architecture + training numerics. Build with HF names or MindFormers aliases."""

    def __init__(self, **kwargs):
        values = self._canonical(kwargs)
        for name, default in _DEFAULTS.items():
            setattr(self, name, copy.deepcopy(values.get(name, default)))
        self._validate()

    # ----- name translation -------------------------------------------------------------------------------
    @staticmethod
    def _canonical(kwargs):
        kwargs = dict(kwargs)
        moe = kwargs.pop("moe_config", None) or {}
        if not isinstance(moe, dict):
            raise ConfigError(f"moe_config ({moe!r}) must be a mapping")
        moe = dict(moe)
        if kwargs.get("extend_method") not in (None, "None", "YARN", "yarn"):
            raise ConfigError(f"extend_method ({kwargs['extend_method']!r}) must be YARN or None: "
                              "DeepSeek-V3 extends its context with YaRN only")
        if str(kwargs.get("extend_method")) == "None":
            kwargs.pop("scaling_factor", None)
        values, origin = {}, {}

        def put(canonical, value, source):
            if canonical in values and values[canonical] != value:
                if source == "moe_config.aux_loss_factor":
                    logger.info("moe_config.aux_loss_factor (%r) ignored: moe_config.aux_loss_factors (%r) "
                                "sets seq_balance_loss_alpha", value, values[canonical])
                    return
                raise ConfigError(f"{source} ({value!r}) contradicts {origin[canonical]} "
                                  f"({values[canonical]!r}): both set {canonical}")
            values[canonical], origin[canonical] = value, source

        for key in list(kwargs):
            if key in _DEFAULTS:
                put(key, kwargs.pop(key), key)
        for alias, canonical in _ALIASES:
            table, key = (moe, alias.split(".", 1)[1]) if alias.startswith("moe_config.") else (kwargs, alias)
            if key not in table:
                continue
            value = table.pop(key)
            if alias == "moe_config.aux_loss_factors":
                require(isinstance(value, (list, tuple)) and len(value) >= 1, alias, value,
                        "must be a non-empty list (its first entry is the sequence-wise balance loss factor)")
                value = value[0]
            put(canonical, value, alias)
        unknown = sorted(set(kwargs) - _IGNORED) + sorted(f"moe_config.{key}" for key in set(moe) - _IGNORED_MOE)
        if unknown:
            known = list(_DEFAULTS) + [alias for alias, _ in _ALIASES]
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            raise ConfigError(f"unknown DeepseekV3Config keys: {', '.join(hints)}")
        for key, accepted in _REQUIRED_HF_VALUES.items():
            if key in kwargs:
                require(kwargs[key] in accepted, key, kwargs[key],
                        f"must be {accepted[0]!r}: this implementation is DeepSeek-V3's router/layout")
        return values

    # ----- validation ---------------------------------------------------------------------------------------
    def _validate(self):
        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if allow_none and value is None:
                return
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                    "must be a positive integer" + (" or null" if allow_none else ""))

        def non_negative(name, integer=False):
            value = getattr(self, name)
            kind = int if integer else (int, float)
            require(isinstance(value, kind) and not isinstance(value, bool) and value >= 0, name, value,
                    "must be " + ("an integer" if integer else "a number") + " >= 0")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
                     "seq_length"):
            positive_int(name)
        positive_int("q_lora_rank", allow_none=True)
        positive_int("moe_dispatch_block_size", allow_none=True)
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            non_negative(name, integer=True)
        for name in ("mtp_loss_factor", "topk_bias_update_rate", "seq_balance_loss_alpha", "initializer_range",
                     "attention_dropout"):
            non_negative(name)
        for name in ("rms_norm_eps", "routed_scaling_factor", "rope_theta"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and value > 0, name, value, "must be a number > 0")
        for name in ("norm_topk_prob", "tie_word_embeddings", "rope_interleave", "attention_bias"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")

        require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
                "must be even (RoPE rotates pairs of dimensions)")
        require(self.num_key_value_heads in (None, self.num_attention_heads), "num_key_value_heads",
                self.num_key_value_heads, f"must equal num_attention_heads ({self.num_attention_heads}): MLA "
                "expands its latent to one key/value per head")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        require(self.hidden_act == "silu", "hidden_act", self.hidden_act, "must be 'silu' (SwiGLU experts)")
        require(not self.attention_bias, "attention_bias", self.attention_bias,
                "must be false: DeepSeek-V3 projections have no bias")
        require(self.attention_dropout == 0, "attention_dropout", self.attention_dropout,
                "must be 0 (DeepSeek-V3 trains without dropout)")
        require(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
                self.first_k_dense_replace, f"must not exceed num_hidden_layers ({self.num_hidden_layers})")
        require(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok", self.num_experts_per_tok,
                f"must not exceed n_routed_experts ({self.n_routed_experts})")
        require(self.n_routed_experts % self.n_group == 0, "n_routed_experts", self.n_routed_experts,
                f"must be divisible by n_group ({self.n_group})")
        require(self.topk_group <= self.n_group, "topk_group", self.topk_group,
                f"must not exceed n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        require(per_group >= 2, "n_group", self.n_group,
                f"must leave at least 2 experts per group (a group is scored by its top-2 experts; "
                f"n_routed_experts is {self.n_routed_experts})")
        require(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                self.num_experts_per_tok, f"must not exceed the experts of the kept groups "
                f"(topk_group {self.topk_group} x {per_group} experts per group)")
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        for name in ("compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type"):
            setattr(self, name, _normalise_dtype(name, getattr(self, name)))
        self.recompute = _normalise_recompute(self.recompute, self.num_hidden_layers + self.num_nextn_predict_layers)
        require(self.moe_dispatch is None or self.moe_dispatch in MOE_DISPATCHES, "moe_dispatch", self.moe_dispatch,
                f"must be one of {', '.join(map(repr, MOE_DISPATCHES))} (None picks the device's default)")
        offset = self.offset
        require(isinstance(offset, int) or (isinstance(offset, (list, tuple)) and all(isinstance(item, int)
                for item in offset)), "offset", offset, "must be an integer or a list of integers (per stage)")

    def check_device(self, device_target):
        """Refuse numerics the device has no kernels for (called by the trainer once the device is known)."""
        target = str(device_target or "").upper()
        if target == "CPU":
            for name in ("compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type"):
                require(getattr(self, name) != "bfloat16", f"model_config.{name}", getattr(self, name),
                        "cannot run with device_target CPU: MindSpore's CPU kernels (MatMul, ...) have no "
                        "bfloat16 implementation; use float32 on CPU (bfloat16 is for Ascend)")
        return self

    # ----- derived sizes ------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mtp_depth(self):
        return self.num_nextn_predict_layers

    def is_moe_layer(self, layer_index):
        """Main layers from first_k_dense_replace on are MoE; MTP blocks (index >= num_hidden_layers) always are."""
        return layer_index >= self.first_k_dense_replace or layer_index >= self.num_hidden_layers

    @property
    def moe_layer_indices(self):
        total = self.num_hidden_layers + self.num_nextn_predict_layers
        return [index for index in range(total) if self.is_moe_layer(index)]

    @property
    def num_moe_layers(self):
        return len(self.moe_layer_indices)

    # ----- HF interchange -----------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path, **overrides):
        """Read an HF `config.json` (a file or the checkpoint directory holding it); training fields from overrides."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(f"{file} does not exist: an HF checkpoint directory holds config.json")
        with open(file, "r", encoding="utf-8") as handle:
            data = json.load(handle)
        model_type = data.get("model_type")
        if model_type not in (None, "deepseek_v3"):
            raise ConfigError(f"model_type ({model_type!r}) in {file} must be 'deepseek_v3'")
        for key, accepted in _REQUIRED_HF_VALUES.items():
            if key in data:
                require(data[key] in accepted, key, data[key],
                        f"must be {accepted[0]!r}: this implementation is DeepSeek-V3's router/layout")
        rope = data.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in data:
            data["rope_theta"] = rope["rope_theta"]
        if "rope_parameters" in data and "rope_scaling" in data:
            data.pop("rope_parameters")      # both written by transformers 5: rope_scaling is the legacy copy
        known = set(_DEFAULTS) | {alias for alias, _ in _ALIASES}
        skipped = sorted(key for key in data if key not in known)
        if skipped:
            logger.debug("config.json keys not used by DeepseekV3Config: %s", ", ".join(skipped))
        values = {key: value for key, value in data.items() if key in known}
        if "max_position_embeddings" in values and "seq_length" not in overrides:
            values["seq_length"] = min(values["max_position_embeddings"], _DEFAULTS["seq_length"])
        values.update(overrides)
        return cls(**values)

    def to_hf_dict(self, torch_dtype="bfloat16"):
        """The `config.json` of the DeepSeek-V3 release layout for this model."""
        data = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for name in HF_FIELDS:
            data[name] = copy.deepcopy(getattr(self, name))
        data["num_key_value_heads"] = self.num_attention_heads
        data.update({"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "ep_size": 1,
                     "use_cache": True, "torch_dtype": torch_dtype})
        return data

    def to_dict(self):
        data = {name: copy.deepcopy(getattr(self, name)) for name in _DEFAULTS}
        data["recompute"] = list(self.recompute)
        return data

    def replace(self, **changes):
        """A validated copy with some fields changed (e.g. `cfg.replace(compute_dtype="float32")`)."""
        values = self.to_dict()
        if len(set(self.recompute)) == 1:
            values["recompute"] = self.recompute[0]
        values.update(changes)
        return type(self)(**values)

    def __repr__(self):
        return f"DeepseekV3Config({', '.join(f'{k}={getattr(self, k)!r}' for k in _DEFAULTS)})"

    def __eq__(self, other):
        return isinstance(other, DeepseekV3Config) and self.to_dict() == other.to_dict()
