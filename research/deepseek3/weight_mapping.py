"""The one table of DeepSeek-V3 parameter names and shapes.

Native names ARE the names of the HuggingFace release (`model.layers.3.mlp.experts.17.up_proj.weight`), so a
checkpoint converts by reading, not by renaming. Everything that needs a name or a shape — the model's
construction check, HF loading, conversion, parameter counting — reads `parameter_specs(model_config)`.

Multi-token prediction (MTP) modules sit after the main layers as `model.layers.{num_hidden_layers + i}` with
`enorm`, `hnorm`, `eh_proj` [H, 2H] (input = concat(enorm(embedding), hnorm(hidden)), embedding first),
a full decoder block (always MoE) and `shared_head.norm`. The MTP modules share the main model's embedding
and output head (DeepSeek-V3 report, section 2.2), yet the official release also stores copies of them as
`model.layers.{L+i}.embed_tokens.weight` and `model.layers.{L+i}.shared_head.head.weight`. They are not
parameters of our model: `release_duplicates(model_config)` names them and the tensor they copy, so loading checks
them against the main tensor (and then ignores them) and exporting writes them, as transformers'
`MtpModel` (ignores them on load) and Megatron-Bridge (maps both onto one tensor) do.
"""
from collections import OrderedDict

from mindpretrain.model_spec import ParameterSpec

# ParameterSpec.group values of this model: embedding | attention | norm | dense_mlp | router | router_bias |
# routed_expert | shared_expert | mtp_proj | final_norm | head; layer: index in model.layers (MTP layers >=
# num_hidden_layers) or None; trainable: False only for e_score_correction_bias.


def layer_prefix(index):
    return f"model.layers.{index}"


def _attention(model_config, prefix, layer):
    heads, hidden = model_config.num_attention_heads, model_config.hidden_size
    q_out = heads * (model_config.qk_nope_head_dim + model_config.qk_rope_head_dim)
    specs = []
    if model_config.q_lora_rank is None:
        specs.append((f"{prefix}.self_attn.q_proj.weight", (q_out, hidden)))
    else:
        specs += [(f"{prefix}.self_attn.q_a_proj.weight", (model_config.q_lora_rank, hidden)),
                  (f"{prefix}.self_attn.q_a_layernorm.weight", (model_config.q_lora_rank,)),
                  (f"{prefix}.self_attn.q_b_proj.weight", (q_out, model_config.q_lora_rank))]
    kv_a_out = model_config.kv_lora_rank + model_config.qk_rope_head_dim
    specs += [(f"{prefix}.self_attn.kv_a_proj_with_mqa.weight", (kv_a_out, hidden)),
              (f"{prefix}.self_attn.kv_a_layernorm.weight", (model_config.kv_lora_rank,)),
              (f"{prefix}.self_attn.kv_b_proj.weight",
               (heads * (model_config.qk_nope_head_dim + model_config.v_head_dim), model_config.kv_lora_rank)),
              (f"{prefix}.self_attn.o_proj.weight", (hidden, heads * model_config.v_head_dim))]
    return [ParameterSpec(name, shape, layer, "norm" if "layernorm" in name else "attention", None, True)
            for name, shape in specs]


def _swiglu(prefix, hidden, intermediate, layer, group, expert=None):
    return [ParameterSpec(f"{prefix}.gate_proj.weight", (intermediate, hidden), layer, group, expert, True),
            ParameterSpec(f"{prefix}.up_proj.weight", (intermediate, hidden), layer, group, expert, True),
            ParameterSpec(f"{prefix}.down_proj.weight", (hidden, intermediate), layer, group, expert, True)]


def _decoder_block(model_config, layer):
    prefix, hidden = layer_prefix(layer), model_config.hidden_size
    specs = [ParameterSpec(f"{prefix}.input_layernorm.weight", (hidden,), layer, "norm", None, True)]
    specs += _attention(model_config, prefix, layer)
    specs.append(ParameterSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,), layer, "norm", None, True))
    if not model_config.is_moe_layer(layer):
        return specs + _swiglu(f"{prefix}.mlp", hidden, model_config.intermediate_size, layer, "dense_mlp")
    experts = model_config.n_routed_experts
    specs += [ParameterSpec(f"{prefix}.mlp.gate.weight", (experts, hidden), layer, "router", None, True),
              ParameterSpec(f"{prefix}.mlp.gate.e_score_correction_bias", (experts,), layer, "router_bias", None,
                            False)]
    for expert in range(experts):
        specs += _swiglu(f"{prefix}.mlp.experts.{expert}", hidden, model_config.moe_intermediate_size, layer,
                         "routed_expert", expert)
    if model_config.n_shared_experts:
        shared_width = model_config.moe_intermediate_size * model_config.n_shared_experts
        specs += _swiglu(f"{prefix}.mlp.shared_experts", hidden, shared_width, layer, "shared_expert")
    return specs


def _mtp_module(model_config, layer):
    prefix, hidden = layer_prefix(layer), model_config.hidden_size
    specs = [ParameterSpec(f"{prefix}.enorm.weight", (hidden,), layer, "norm", None, True),
             ParameterSpec(f"{prefix}.hnorm.weight", (hidden,), layer, "norm", None, True),
             ParameterSpec(f"{prefix}.eh_proj.weight", (hidden, 2 * hidden), layer, "mtp_proj", None, True)]
    specs += _decoder_block(model_config, layer)
    specs.append(ParameterSpec(f"{prefix}.shared_head.norm.weight", (hidden,), layer, "norm", None, True))
    return specs


def parameter_specs(model_config, include_mtp=True):
    """Every parameter of the native model, in model order: embedding, layers, final norm, head, MTP modules."""
    hidden = model_config.hidden_size
    vocab = model_config.vocab_size
    specs = [ParameterSpec("model.embed_tokens.weight", (vocab, hidden), None, "embedding", None, True)]
    for layer in range(model_config.num_hidden_layers):
        specs += _decoder_block(model_config, layer)
    specs.append(ParameterSpec("model.norm.weight", (hidden,), None, "final_norm", None, True))
    if not model_config.tie_word_embeddings:
        specs.append(ParameterSpec("lm_head.weight", (vocab, hidden), None, "head", None, True))
    if include_mtp:
        for depth in range(model_config.num_nextn_predict_layers):
            specs += _mtp_module(model_config, model_config.num_hidden_layers + depth)
    return specs


def hf_parameter_shapes(model_config, include_mtp=True):
    """OrderedDict name -> shape tuple of the native model (= HF names, without the release's MTP duplicates)."""
    return OrderedDict((spec.name, tuple(spec.shape)) for spec in parameter_specs(model_config, include_mtp))


def head_name(model_config):
    """The tensor the output head reads: lm_head.weight, or the embedding when tie_word_embeddings."""
    return "model.embed_tokens.weight" if model_config.tie_word_embeddings else "lm_head.weight"


def release_duplicates(model_config):
    """OrderedDict duplicate name -> native name it copies: the MTP embedding/head copies of the HF release."""
    duplicates = OrderedDict()
    for depth in range(model_config.num_nextn_predict_layers):
        prefix = layer_prefix(model_config.num_hidden_layers + depth)
        duplicates[f"{prefix}.embed_tokens.weight"] = "model.embed_tokens.weight"
        duplicates[f"{prefix}.shared_head.head.weight"] = head_name(model_config)
    return duplicates


def release_parameter_shapes(model_config):
    """Name -> shape of everything an HF export writes: native parameters plus the MTP duplicates."""
    shapes = hf_parameter_shapes(model_config)
    for duplicate, source in release_duplicates(model_config).items():
        shapes[duplicate] = shapes[source]
    return shapes


def non_trainable_names(model_config):
    """Parameters updated outside the optimizer (the aux-loss-free expert bias)."""
    return [spec.name for spec in parameter_specs(model_config) if not spec.trainable]
