"""`DeepseekV3Config`: the one description of a DeepSeek-V3 model, validated once when it is built.

A dataclass whose fields are those of the HuggingFace `config.json` of the DeepSeek-V3 release (defaults: the
671B release) plus the training fields, so a config read with `from_hf(dir)` and one written by `to_hf_dict()`
need no translation. MindFormers users keep their YAML: its names (`num_layers`, `num_heads`,
`moe_config: {expert_num, ...}`, `mtp_depth`, `scaling_factor`, ...) are translated by the constructor through
`DeepseekV3Config.mindformers_aliases()`, the single table of alternative names.

Every inconsistency is a `ConfigError` naming the key, the value and the rule, raised at
construction — before any weight is allocated. `check_device(device_target)` adds the one rule that
depends on where the run happens (bfloat16 kernels do not exist on MindSpore's CPU backend).
"""
import copy
import dataclasses
import difflib
import json
import os
from typing import Optional, Sequence, Union

from mindpretrain.registry import register
from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import ConfigError, require

logger = get_logger("deepseek3.config")

DTYPE_NAMES = ("float32", "float16", "bfloat16")
RECOMPUTE_MODES = ("none", "full", "selective")

# MindFormers / HF keys that describe kernels, inference or bookkeeping, not the model being trained. They are
# accepted and reported once (`DeepseekV3Config.no_effect_keys`); any other unknown key is refused.
_IGNORED = frozenset((
    "batch_size", "multiple_of", "ffn_dim_multiplier", "ignore_token_id", "rotary_dtype", "router_dense_type",
    "use_past", "use_fused_swiglu", "use_fused_rope", "input_sliced_sig",
    "checkpoint_name_or_path", "return_extra_loss", "qkv_concat", "ffn_concat", "qkv_has_bias", "block_size",
    "num_blocks", "repetition_penalty", "max_decode_length", "top_k", "top_p", "do_sample", "is_dynamic",
    "auto_map", "auto_register", "fine_grain_interleave", "pp_interleave_num", "extend_method",
    "parallel_config", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "quantization_config", "pretraining_tp", "output_router_logits", "ep_size", "aux_loss_alpha", "seq_aux",
    "topk_method", "scoring_func", "moe_layer_freq", "head_dim", "qk_head_dim", "_name_or_path", "type",
    "enable_fa_var_len", "return_hidden_states", "is_mtp_model", "n_kv_heads",
))
# MindFormers' MoEConfig vocabulary without an effect here (kernel switches, expert-placement heuristics;
# `capacity_factor` is an alias read by the capacity dispatch only, reported as a no-op with the others).
# `aux_loss_factor` belongs to MindFormers' v1 router; DeepSeek-V3 (TopkRouterV2, MoEV3) reads only
# `aux_loss_types`/`aux_loss_factors`.
_IGNORED_MOE = frozenset((
    "expert_group_size", "routing_policy", "use_fused_ops_topkrouter", "aux_loss_factor",
    "expert_model_parallel", "callback_moe_droprate", "use_fused_ops_permute",
    "enable_gmm_safe_tokens", "enable_sdrop", "group_wise_a2a", "num_experts_chosen_per_group",
    "enable_deredundency", "npu_nums_per_device", "use_allgather_dispatcher", "comp_comm_parallel",
    "comp_comm_parallel_degree", "save_token_distribution", "cur_layer", "enable_cold_hot_expert", "update_step",
    "hot_expert_num", "cold_token_percent", "moe_module_name", "router_dense_type", "max_router_load",
    "topk_method", "moe_shared_expert_overlap", "dispatch_global_max_bs", "ep_extend_tp",
))
# MindFormers MoE keys whose value is fixed by this implementation: any other value is a different model.
_REQUIRED_MOE_VALUES = {"use_gating_sigmoid": (True,), "z_loss_factor": (0, 0.0), "use_shared_expert_gating": (False,)}
# Accepted here but honoured elsewhere (registry type, YaRN switch, ParallelConfig), so never reported as no-ops.
_READ_ELSEWHERE = frozenset(("type", "extend_method", "moe_config.expert_model_parallel"))
# Why a no-op key has no effect, when the name alone does not say it.
NO_EFFECT_REASONS = {
    "n_kv_heads": "MLA expands its latent to one key/value per query head, so MindFormers ignores it too",
    "moe_config.aux_loss_factor": "read by MindFormers' v1 router only; DeepSeek-V3 uses aux_loss_factors",
    "moe_config.capacity_factor": "read by moe_dispatch: capacity only; the other dispatches drop no token",
    "moe_config.use_gmm": "read under semi-auto parallel with expert_parallel > 1 only (dropless grouped "
                          "dispatch or capacity); the other layouts' dispatches drop no token",
    "moe_config.aux_loss_factors": "MindFormers' MoEConfig drops aux_loss_factors without aux_loss_types "
                                   "(no balance loss)",
}
# MindFormers' auxiliary balance losses (TopkRouterV2 / MoEV3, mindformers/modules/transformer/moe.py, moev3.py):
# "expert" balances experts over each token group of the micro batch (balance_loss_kind "mindformers_expert",
# research/deepseek3/moe.py); "device"/"comm" balance groups of experts and are not implemented.
AUX_LOSS_TYPES = ("expert", "device", "comm")
# Balance losses the MoE block computes: DeepSeek-V3's sequence-wise loss, or MindFormers' "expert" loss.
BALANCE_LOSS_KINDS = ("sequence", "mindformers_expert")

# How routed tokens reach their experts (research/deepseek3/moe.py explains both).
MOE_DISPATCHES = ("block_sparse", "grouped_matmul", "capacity", "dense")
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


def _check_required_hf_values(values):
    """Refuse HF keys whose value would describe another model (softmax router, other top-k method, ...)."""
    for key, accepted in _REQUIRED_HF_VALUES.items():
        if key in values:
            require(values[key] in accepted, key, values[key],
                    f"must be {accepted[0]!r}: this implementation is DeepSeek-V3's router/layout")


def _mindformers_aux_loss(factors, types):
    """MindFormers' `aux_loss_factors` / `aux_loss_types` -> {canonical name: value} of our balance loss.

    MindFormers pairs the two lists by position (zip) and, when `aux_loss_types` is missing, drops the factors
    (MoEConfig's `_check_aux_loss_config`): no balance loss then, an empty result here. The "expert" factor turns
    on its micro-batch expert loss (`balance_loss_kind: mindformers_expert`). "device" and "comm" (balance of
    expert groups and of expert-parallel ranks, read only by its MoEV2/TopkRouterV2 path) are not implemented,
    so only a factor of 0 is accepted for them.
    """
    key = "moe_config.aux_loss_factors"
    require(isinstance(factors, (list, tuple)) and len(factors) >= 1, key, factors,
            "must be a non-empty list of numbers, one per entry of moe_config.aux_loss_types")
    if types is None:
        return {}
    require(isinstance(types, list) and all(item in AUX_LOSS_TYPES for item in types), "moe_config.aux_loss_types",
            types, f"must be a list of {', '.join(map(repr, AUX_LOSS_TYPES))}")
    require(len(types) == len(factors) or len(types) == 1, key, list(factors),
            f"must have one factor per entry of moe_config.aux_loss_types ({types})")
    paired = dict(zip(types, factors))
    for kind in ("device", "comm"):
        require(not paired.get(kind), key, list(factors),
                f"gives the {kind!r} balance loss factor {paired.get(kind)!r}; mindpretrain implements only the "
                "'expert' loss (the others balance expert groups and expert-parallel ranks), set them to 0")
    return {"seq_balance_loss_alpha": paired.get("expert", 0.0), "balance_loss_kind": "mindformers_expert"}


def _check_required_moe_values(moe):
    """Refuse MoEConfig values that would describe another router (softmax gating, z-loss, gated shared expert)."""
    for key, accepted in _REQUIRED_MOE_VALUES.items():
        if key in moe:
            value = moe.pop(key)
            require(value in accepted, f"moe_config.{key}", value, f"must be {accepted[0]!r}: this implementation is DeepSeek-V3's sigmoid router without them")


def _training_field(default):
    """A field that is not part of HF's config.json (numerics, losses, memory, layout)."""
    return dataclasses.field(default=default, metadata={"in_hf_config": False})


@register("config")
@dataclasses.dataclass(init=False, eq=False)
class DeepseekV3Config:
    """DeepSeek-V3 architecture + training numerics. Build with HF names or MindFormers aliases.

    The constructor is written by hand rather than generated: it takes the canonical field names and the
    MindFormers aliases alike (the registry builds it from a YAML section), then validates and normalises.
    """

    # --- HF config.json fields (the DeepSeek-V3 671B release) ---
    vocab_size: int = 129280
    """Tokens in the vocabulary: rows of the embedding and of the output head."""
    hidden_size: int = 7168
    """Width H of the residual stream."""
    intermediate_size: int = 18432
    """Hidden width of the dense SwiGLU FFN of the first `first_k_dense_replace` layers."""
    moe_intermediate_size: int = 2048
    """Hidden width of each routed expert's SwiGLU FFN (shared experts: this times n_shared_experts)."""
    num_hidden_layers: int = 61
    """Main decoder blocks, MTP modules not counted."""
    num_attention_heads: int = 128
    """Attention heads N."""
    num_key_value_heads: Optional[int] = None
    """Must equal num_attention_heads (MLA expands its latent to one key/value per head); None is filled with it."""
    n_shared_experts: int = 1
    """Shared experts every token of an MoE layer passes through (0: none)."""
    n_routed_experts: int = 256
    """Routed experts E per MoE layer."""
    routed_scaling_factor: float = 2.5
    """Multiplier of the chosen experts' gate weights (after norm_topk_prob)."""
    kv_lora_rank: int = 512
    """Width of MLA's compressed key/value latent."""
    q_lora_rank: Optional[int] = 1536
    """Width of the compressed query latent; None projects queries directly (`q_proj`)."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dimensions that carry RoPE (the key part is one head shared by all); even."""
    v_head_dim: int = 128
    """Per-head value dimensions."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dimensions without position encoding."""
    n_group: int = 8
    """Expert groups of group-limited routing; each must hold at least 2 experts."""
    topk_group: int = 4
    """Groups kept per token (ranked by the sum of their top-2 biased scores)."""
    num_experts_per_tok: int = 8
    """Routed experts chosen per token (top-k over the kept groups)."""
    first_k_dense_replace: int = 3
    """Main layers below this index use the dense FFN, the others are MoE."""
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' gate weights to sum to 1."""
    hidden_act: str = "silu"
    """FFN activation; only 'silu' (SwiGLU)."""
    max_position_embeddings: int = 4096
    """Context length the HF config declares; `seq_length` sizes the RoPE tables."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""
    rms_norm_eps: float = 1e-6
    """Epsilon added to the mean square in every RMSNorm."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the output head (no `lm_head.weight`)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: Optional[dict] = None
    """YaRN parameters (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim;
    the last four get defaults), or None for plain RoPE."""
    rope_interleave: bool = True
    """Rotary dimensions stored as interleaved pairs, as in the release; False rotates the two halves."""
    attention_bias: bool = False
    """Must be False: DeepSeek-V3 projections have no bias."""
    attention_dropout: float = 0.0
    """Must be 0: DeepSeek-V3 trains without dropout."""
    num_nextn_predict_layers: int = 1
    """Multi-token-prediction modules D, stored as layers after the main ones."""
    bos_token_id: Optional[int] = 0
    """Beginning-of-sequence token id (written to config.json; not used in training)."""
    eos_token_id: Optional[int] = 1
    """End-of-sequence token id (written to config.json; not used in training)."""
    pad_token_id: Optional[int] = None
    """Padding token id (written to config.json; None in the release)."""

    # --- training fields (not in config.json) ---
    seq_length: int = _training_field(4096)
    """Training sequence length in tokens: the longest input (it sizes the RoPE tables)."""
    compute_dtype: str = _training_field("bfloat16")
    """Dtype of matmuls and activations (one of DTYPE_NAMES; fp32/bf16/mstype names accepted)."""
    param_init_type: str = _training_field("float32")
    """Dtype the parameters are stored in."""
    layernorm_compute_type: str = _training_field("float32")
    """Dtype RMSNorm computes in."""
    softmax_compute_type: str = _training_field("float32")
    """Dtype of the attention softmax."""
    mtp_loss_factor: float = _training_field(0.3)
    """Weight of the mean MTP loss in the training loss."""
    topk_bias_update_rate: float = _training_field(0.001)
    """Step of the aux-loss-free balancing: each expert's routing bias moves by this much per update."""
    seq_balance_loss_alpha: float = _training_field(0.0001)
    """Factor of the balance loss (0 turns it off); MindFormers' aux_loss_factors "expert" entry."""
    balance_loss_kind: str = _training_field("sequence")
    """One of BALANCE_LOSS_KINDS: "sequence" (DeepSeek-V3's per-sequence loss) or "mindformers_expert"
    (MindFormers' loss over each token group of the micro batch; set by moe_config.aux_loss_types)."""
    balance_loss_token_groups: int = _training_field(1)
    """mindformers_expert only: contiguous token groups the micro batch is split into, each balanced on its own
    (MindFormers' data-parallel shards of a semi-auto parallel batch); 1 = the batch the MoE layer sees."""
    recompute: Union[bool, str, Sequence] = _training_field(False)
    """Activation recompute, a bool, a mode of RECOMPUTE_MODES or one per layer; normalised to a per-layer tuple
    (main layers, then MTP layers)."""
    moe_dispatch_block_size: Optional[int] = _training_field(None)
    """Rows per block of the block-sparse MoE dispatch; None lets moe.py choose from the token count."""
    moe_dispatch: Optional[str] = _training_field(None)
    """Routed-expert compute, one of MOE_DISPATCHES; None picks the device's default (see moe.py)."""
    moe_capacity_factor: float = _training_field(1.1)
    """Capacity factor of the ``capacity`` dispatch (MindFormers' moe_config.capacity_factor, default 1.1 as
    there): slots per expert and data-parallel shard = ceil(K * tokens * factor / E); no effect elsewhere."""
    use_gmm: Optional[bool] = _training_field(None)
    """MindFormers' moe_config.use_gmm, read under semi-auto parallel with expert_parallel > 1 only: True (or
    None) builds the dropless exchanged grouped-matmul dispatch (MoEV3), False the capacity dispatch
    (mindpretrain.parallel.plan.semi_auto_moe_dispatch); every other layout's dispatches drop nothing anyway."""
    moe_token_dispatcher_type: Optional[str] = _training_field(None)
    """Token exchange with experts split over expert_parallel ranks (Megatron's name): "allgather" or "alltoall";
    None: alltoall on Ascend, allgather elsewhere (mindpretrain/parallel/expert_groups.py)."""
    offset: Union[int, Sequence[int]] = _training_field(0)
    """Pipeline layer offset, an integer or one per stage (MindFormers `offset`, read by the parallel layout)."""
    use_flash_attention: bool = _training_field(False)
    """Ascend: attention through FlashAttentionScore in the TND layout (flash_attention.py); ignored with a notice
    elsewhere, where the explicit-mask core computes the same attention."""

    def __init__(self, **kwargs):
        """Canonical names or MindFormers aliases; unknown keys, contradictions and invalid values raise."""
        values, no_effect = self._canonical(kwargs)
        for name, default in self._defaults().items():
            setattr(self, name, copy.deepcopy(values.get(name, default)))
        self.no_effect_keys = no_effect
        """Keys accepted without effect (MindFormers kernel switches, inference settings, ...), dotted and in the
        order given; `mindpretrain.model_builder` prefixes them with their place in the run YAML."""
        self._validate()

    @classmethod
    def _defaults(cls):
        """{field name: default}, in field order: the one list of canonical names."""
        return {field.name: field.default for field in dataclasses.fields(cls)}

    # ----- name translation -------------------------------------------------------------------------------
    @classmethod
    def mindformers_aliases(cls):
        """The one table of alternative names: (where it is found, canonical name). `moe_config.x` is the key x
        inside a nested `moe_config` mapping (MindFormers keeps MoE settings there)."""
        return (
            ("num_layers", "num_hidden_layers"),
            ("num_heads", "num_attention_heads"),
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
            ("moe_config.aux_loss_factors", "seq_balance_loss_alpha"),   # its "expert" entry (_mindformers_aux_loss)
            ("moe_config.capacity_factor", "moe_capacity_factor"),     # the capacity dispatch's only
            ("moe_config.use_gmm", "use_gmm"),                          # semi-auto expert parallelism only
        )

    @classmethod
    def _known_names(cls):
        return list(cls._defaults()) + [alias for alias, _ in cls.mindformers_aliases()]

    @classmethod
    def _canonical(cls, kwargs):
        """Constructor arguments (canonical names, aliases, no-op keys) -> ({canonical name: value}, no-op keys)."""
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
                raise ConfigError(f"{source} ({value!r}) contradicts {origin[canonical]} "
                                  f"({values[canonical]!r}): both set {canonical}")
            values[canonical], origin[canonical] = value, source

        defaults = cls._defaults()
        for key in list(kwargs):
            if key in defaults:
                put(key, kwargs.pop(key), key)
        dropped = []
        if "aux_loss_factors" in moe:
            translated = _mindformers_aux_loss(moe.pop("aux_loss_factors"), moe.pop("aux_loss_types", None))
            for canonical, value in translated.items():
                put(canonical, value, "moe_config.aux_loss_factors")
            dropped += [] if translated else ["moe_config.aux_loss_factors"]
        moe.pop("aux_loss_types", None)
        if moe.get("balance_via_topk_bias", True) is False:
            put("topk_bias_update_rate", 0.0, "moe_config.balance_via_topk_bias")
        moe.pop("balance_via_topk_bias", None)
        for alias, canonical in cls.mindformers_aliases():
            table, key = (moe, alias.split(".", 1)[1]) if alias.startswith("moe_config.") else (kwargs, alias)
            if key in table:
                put(canonical, table.pop(key), alias)
        _check_required_moe_values(moe)
        cls._refuse_unknown(sorted(set(kwargs) - _IGNORED) + sorted(f"moe_config.{key}"
                                                                    for key in set(moe) - _IGNORED_MOE))
        _check_required_hf_values(kwargs)
        no_effect = [key for key in kwargs] + [f"moe_config.{key}" for key in moe] + dropped
        if "moe_capacity_factor" in values and origin["moe_capacity_factor"].startswith("moe_config.") \
                and values.get("moe_dispatch") != "capacity":
            no_effect.append(origin["moe_capacity_factor"])         # read by the capacity dispatch only
        if "use_gmm" in values:         # acts under semi-auto expert parallelism only; the launcher says when
            no_effect.append(origin["use_gmm"])
        no_effect = tuple(key for key in no_effect if key not in _READ_ELSEWHERE)
        return values, no_effect

    @classmethod
    def _refuse_unknown(cls, unknown):
        """One ConfigError listing every unknown key, each with the closest known name when there is one."""
        if not unknown:
            return
        known = cls._known_names()
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ConfigError(f"unknown DeepseekV3Config keys: {', '.join(hints)}")

    # ----- validation ---------------------------------------------------------------------------------------
    def _validate(self):
        self._check_value_types()
        self._check_architecture()
        self._normalise_training_fields()

    def _check_value_types(self):
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
                     "seq_length", "balance_loss_token_groups"):
            positive_int(name)
        require(self.balance_loss_kind in BALANCE_LOSS_KINDS, "balance_loss_kind", self.balance_loss_kind,
                f"must be one of {', '.join(map(repr, BALANCE_LOSS_KINDS))}")
        positive_int("q_lora_rank", allow_none=True)
        positive_int("moe_dispatch_block_size", allow_none=True)
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            non_negative(name, integer=True)
        for name in ("mtp_loss_factor", "topk_bias_update_rate", "seq_balance_loss_alpha", "initializer_range",
                     "attention_dropout"):
            non_negative(name)
        for name in ("rms_norm_eps", "routed_scaling_factor", "rope_theta", "moe_capacity_factor"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and value > 0, name, value, "must be a number > 0")
        for name in ("norm_topk_prob", "tie_word_embeddings", "rope_interleave", "attention_bias", "use_flash_attention"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")

    def _check_architecture(self):
        """The rules that make it DeepSeek-V3: MLA head layout, SwiGLU, no bias/dropout, group-limited routing."""
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

    def _normalise_training_fields(self):
        """YaRN dict with every key, dtype names, per-layer recompute modes; dispatch and offset checked."""
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        for name in ("compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type"):
            setattr(self, name, _normalise_dtype(name, getattr(self, name)))
        self.recompute = _normalise_recompute(self.recompute, self.num_hidden_layers + self.num_nextn_predict_layers)
        require(self.moe_dispatch is None or self.moe_dispatch in MOE_DISPATCHES, "moe_dispatch", self.moe_dispatch,
                f"must be one of {', '.join(map(repr, MOE_DISPATCHES))} (None picks the device's default)")
        require(self.use_gmm in (None, True, False), "moe_config.use_gmm", self.use_gmm, "must be True or False")
        require(self.moe_token_dispatcher_type in (None, "allgather", "alltoall"), "moe_token_dispatcher_type",
                self.moe_token_dispatcher_type, "must be 'allgather' or 'alltoall' (None picks the device's default)")
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
        if target != "ASCEND" and self.use_flash_attention:
            logger.info("model_config.use_flash_attention: True has no effect on %s (Ascend's FlashAttentionScore); "
                        "the explicit-mask attention core computes the same attention", target or "this device")
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
        _check_required_hf_values(data)
        rope = data.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in data:
            data["rope_theta"] = rope["rope_theta"]
        if "rope_parameters" in data and "rope_scaling" in data:
            data.pop("rope_parameters")      # both written by transformers 5: rope_scaling is the legacy copy
        known = set(cls._known_names())
        skipped = sorted(key for key in data if key not in known)
        if skipped:
            logger.debug("config.json keys not used by DeepseekV3Config: %s", ", ".join(skipped))
        values = {key: value for key, value in data.items() if key in known}
        if "max_position_embeddings" in values and "seq_length" not in overrides:
            values["seq_length"] = min(values["max_position_embeddings"], cls._defaults()["seq_length"])
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
        data = {name: copy.deepcopy(getattr(self, name)) for name in self._defaults()}
        data["recompute"] = list(self.recompute)
        return data

    def replace(self, **changes):
        """A validated copy with some fields changed (e.g. `model_config.replace(compute_dtype="float32")`)."""
        values = self.to_dict()
        if len(set(self.recompute)) == 1:
            values["recompute"] = self.recompute[0]
        values.update(changes)
        copied = type(self)(**values)
        copied.no_effect_keys = self.no_effect_keys
        return copied

    def __eq__(self, other):
        return isinstance(other, DeepseekV3Config) and self.to_dict() == other.to_dict()


# The fields written to and read from HF's config.json, in field order.
HF_FIELDS = tuple(field.name for field in dataclasses.fields(DeepseekV3Config)
                  if field.metadata.get("in_hf_config", True))
