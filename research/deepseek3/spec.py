"""DeepSeek-V3 as the core sees it: the plugin's one `ModelSpec`, registered when the plugin is imported.

Conversion, planning, the parallel layouts and the trainer reach this model only through `DEEPSEEK_V3_SPEC`
(found with `mindpretrain.model_spec.spec_for_config` / `spec_for_model_type`), never by importing this
package. Importing this module does not import MindSpore: HF weight loading, which needs it, is imported on
first call.
"""
from mindpretrain.model_spec import ModelSpec, PlanningHooks, ShardTable, register_spec
from research.deepseek3 import planning, sharding
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.mindformers_weights import MINDFORMERS_LAYOUT
from research.deepseek3.parameter_count import count_parameters
from research.deepseek3.weight_mapping import parameter_specs, release_duplicates

_DESCRIBED_FIELDS = ("hidden_size", "num_hidden_layers", "n_routed_experts", "vocab_size", "num_nextn_predict_layers")
_NOT_CONFIG_KEYS = ("type", "auto_register")     # registry keys of a YAML `model.model_config` section


def config_from_dict(values):
    """A `DeepseekV3Config` from YAML `model.model_config` values (HF names or MindFormers aliases)."""
    return DeepseekV3Config(**{key: value for key, value in values.items() if key not in _NOT_CONFIG_KEYS})


def hf_config_dict(model_config, torch_dtype):
    return model_config.to_hf_dict(torch_dtype=torch_dtype)


def describe(model_config):
    """The sizes that tell two DeepSeek-V3 configs apart, for error messages."""
    return ", ".join(f"{name}={getattr(model_config, name)}" for name in _DESCRIBED_FIELDS)


def load_hf_weights(model, path, allow_missing_mtp=False, drop_mtp=False):
    """`research.deepseek3.hf_weights.load_hf_weights`, imported on first use (it imports MindSpore)."""
    from research.deepseek3 import hf_weights

    return hf_weights.load_hf_weights(model, path, allow_missing_mtp=allow_missing_mtp, drop_mtp=drop_mtp)


def cached_decoder(model, batch_size, max_length):
    """`research.deepseek3.generation.DeepseekV3CachedDecoder`, imported on first use (it imports MindSpore)."""
    from research.deepseek3 import generation

    return generation.cached_decoder(model, batch_size, max_length)


def prepare_parallel(model, parallel_config):
    """Flash-attention cores count their rows per data-parallel shard (MindSpore does not rewrite the TND segment
    lists when it splits the batch): flash_attention.set_batch_shards; the capacity dispatch counts its expert
    capacity per data-parallel shard of tokens too (capacity_dispatch.set_dp_groups)."""
    from research.deepseek3 import capacity_dispatch, flash_attention

    flash_attention.set_batch_shards(model, int(parallel_config.data_parallel))
    capacity_dispatch.set_dp_groups(model, int(parallel_config.data_parallel))
    set_balance_token_groups(model, parallel_config)


def set_balance_token_groups(model, parallel_config):
    """MindFormers' "expert" balance loss averages over one token group per data-parallel shard (times model
    parallel under sequence parallelism, as its TopkRouterV2 reshapes): the MoE blocks take that count under
    semi-auto parallel, where the batch they see is the global one. Returns the group count."""
    from research.deepseek3.moe import DeepseekV3MoE

    groups = int(parallel_config.data_parallel)
    if getattr(parallel_config, "use_seq_parallel", False):
        groups *= int(parallel_config.model_parallel)
    for _, cell in model.cells_and_names():
        if isinstance(cell, DeepseekV3MoE):
            cell.balance_groups = groups
    return groups


def without_mtp(model_config):
    """The same model without multi-token prediction (a per-layer recompute list loses its MTP entries)."""
    recompute = list(model_config.recompute)[:model_config.num_hidden_layers]
    return model_config.replace(num_nextn_predict_layers=0,
                                recompute=recompute[0] if len(set(recompute)) == 1 else recompute)


SHARD_TABLE = ShardTable(weight_kinds=sharding.WEIGHT_KINDS, op_symbols=sharding.OP_SYMBOLS,
                         matmul_ops=sharding.MATMUL_OPS, layout_ops=sharding.LAYOUT_OPS)

PLANNING = PlanningHooks(layer_activation_terms=planning.layer_activation_terms,
                         selective_recompute_drops=planning.SELECTIVE_RECOMPUTE_DROPS,
                         head_activation_terms=planning.head_activation_terms,
                         backward_transient_terms=planning.backward_transient_terms,
                         flops_per_token=planning.flops_per_token)

DEEPSEEK_V3_SPEC = register_spec(ModelSpec(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    config_class=DeepseekV3Config,
    model_class="DeepseekV3ForCausalLM",
    config_from_hf=DeepseekV3Config.from_hf,
    config_from_dict=config_from_dict,
    hf_config_dict=hf_config_dict,
    parameter_specs=parameter_specs,
    release_duplicates=release_duplicates,
    parameter_counts=count_parameters,
    describe=describe,
    load_hf_weights=load_hf_weights,
    shard_table=SHARD_TABLE,
    planning=PLANNING,
    without_mtp=without_mtp,
    foreign_layouts=(MINDFORMERS_LAYOUT,),
    prepare_parallel=prepare_parallel,
    cached_decoder=cached_decoder,
    # initialisation, special token ids, the length bound and dropout: the same weights compute the same function
    hf_config_ignored=("initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                       "attention_dropout"),
))
