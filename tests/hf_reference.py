"""Test-only reference: a tiny random HuggingFace DeepSeek-V3 checkpoint laid out like the official release.

Tests import it as `from hf_reference import build_tiny_hf_deepseek_v3` (pytest puts `tests/` on sys.path because
`tests/` has no `__init__.py`). The library never imports this module: torch and transformers are test-only.

Why each step exists:
- transformers builds `DeepseekV3ForCausalLM` without multi-token-prediction layers, yet the official checkpoint
  ships them as `model.layers.{num_hidden_layers + i}.*` (enorm, hnorm, eh_proj, shared_head, a full MoE decoder
  block, plus copies of the embedding and output head). `add_mtp_layers=True` writes those tensors too, so conversion
  and loading of MTP layers are exercised.
- Norm weights and `e_score_correction_bias` are initialised to 1 and 0 by transformers; a test comparing two
  implementations would not notice a missing norm or a bias ignored in routing. We perturb them.
- The checkpoint is re-sharded into `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
  (MTP tensors in the last shard, as in the official release), so multi-shard readers are exercised.
- `config_style="official"` stores the rope settings the way DeepSeek-V3's own config.json does (`rope_scaling`
  with `"type": "yarn"`, top-level `rope_theta`); `"transformers"` keeps what transformers 5 writes
  (`rope_parameters` with `rope_type` and `rope_theta` inside).
"""
import json
import os

import numpy as np

TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,          # > 128: the dense MLP has ragged 128x128 fp8 blocks
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
    initializer_range=0.1,          # larger than the 0.02 default so logits and routing scores are well spread
)

# Weights that the official release keeps in bf16 (everything else 2-D is fp8 with 128x128 block scales);
# mirrors SKIP_QUANT_PATTERNS of DeepSeek's inference/bf16_cast_fp8.py and the released index.
_UNQUANTISED_SUFFIXES = ("layernorm.weight", "norm.weight", "embed_tokens.weight", "head.weight", "lm_head.weight",
                         "eh_proj.weight", "mlp.gate.weight", "e_score_correction_bias")
FP8_BLOCK = 128
FP8_MAX = 448.0


def tiny_config_kwargs(**overrides):
    """The tiny config as DeepseekV3Config keyword arguments (HF names), with overrides applied."""
    kwargs = json.loads(json.dumps(TINY_CONFIG))
    kwargs.update(overrides)
    if kwargs.get("rope_scaling") is None:
        kwargs.pop("rope_scaling", None)
    return kwargs


def build_tiny_hf_deepseek_v3(tmp_dir, seed=0, add_mtp_layers=True, num_shards=3, config_style="official",
                              **config_overrides):
    """Build, perturb and save a tiny random transformers DeepseekV3ForCausalLM (fp32, CPU, eval mode).

    Returns `(hf_model, hf_dir)`; `hf_dir` (= `tmp_dir/hf`) holds config.json, the shards and the index.
    With `add_mtp_layers`, `num_nextn_predict_layers` MTP layers are appended to the checkpoint only
    (`hf_model` does not use them; transformers ignores them on load with a warning).
    """
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kwargs = tiny_config_kwargs(**config_overrides)
    torch.manual_seed(seed)
    config = DeepseekV3Config(**kwargs)
    model = DeepseekV3ForCausalLM(config).eval()
    _perturb_norms_and_biases(model, seed)

    hf_dir = os.path.join(str(tmp_dir), "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    tensors = _read_all(hf_dir)
    if add_mtp_layers:
        tensors.update(make_mtp_tensors(config, tensors, seed))
    write_sharded(hf_dir, tensors, num_shards)
    if config_style == "official":
        _write_official_style_config(hf_dir, kwargs)
    return model, hf_dir


def _perturb_norms_and_biases(model, seed):
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def _read_all(hf_dir):
    """All tensors of a saved directory as torch tensors (tiny models only), and remove the files read."""
    from safetensors.torch import load_file

    tensors = {}
    for file_name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, file_name)
        if file_name.endswith(".safetensors"):
            tensors.update(load_file(path))
            os.remove(path)
        elif file_name == "model.safetensors.index.json":
            os.remove(path)
    return tensors


def make_mtp_tensors(config, main_tensors, seed):
    """Random MTP layers named as in the official DeepSeek-V3 checkpoint (`model.layers.61.*` for the 671B model).

    Layer `L = num_hidden_layers + i` holds `enorm`, `hnorm`, `eh_proj` [H, 2H], `shared_head.norm`, one decoder
    block (always MoE: L >= first_k_dense_replace) and copies of `model.embed_tokens` / `lm_head` under
    `embed_tokens` / `shared_head.head` (the release stores the shared tensors again in each MTP layer).
    """
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    tensors = {}
    hidden = config.hidden_size
    generator = torch.Generator().manual_seed(seed + 2)
    for depth in range(config.num_nextn_predict_layers):
        layer_index = config.num_hidden_layers + depth
        prefix = f"model.layers.{layer_index}."
        torch.manual_seed(seed + 100 + depth)
        block = DeepseekV3DecoderLayer(config, layer_index)
        with torch.no_grad():
            for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
                if name.endswith("norm.weight"):
                    tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
                elif name.endswith("e_score_correction_bias"):
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
                else:
                    tensor.copy_(config.initializer_range * torch.randn(tensor.shape, generator=generator))
        for name, tensor in block.state_dict().items():
            tensors.update(_unfuse_experts(prefix + name, tensor.detach().clone(), config))
        tensors[prefix + "enorm.weight"] = 1.0 + 0.2 * torch.randn(hidden, generator=generator)
        tensors[prefix + "hnorm.weight"] = 1.0 + 0.2 * torch.randn(hidden, generator=generator)
        tensors[prefix + "eh_proj.weight"] = config.initializer_range * torch.randn(hidden, 2 * hidden,
                                                                                     generator=generator)
        tensors[prefix + "shared_head.norm.weight"] = 1.0 + 0.2 * torch.randn(hidden, generator=generator)
        tensors[prefix + "embed_tokens.weight"] = main_tensors["model.embed_tokens.weight"].clone()
        head = main_tensors.get("lm_head.weight", main_tensors["model.embed_tokens.weight"])   # tied: no lm_head
        tensors[prefix + "shared_head.head.weight"] = head.clone()
    return tensors


def _unfuse_experts(name, tensor, config):
    """transformers 5 fuses experts ([E, 2I, H] gate_up_proj, [E, H, I] down_proj); checkpoints store them per expert."""
    if name.endswith("mlp.experts.gate_up_proj"):
        base = name[: -len("gate_up_proj")]
        inter = config.moe_intermediate_size
        out = {}
        for expert in range(tensor.shape[0]):
            out[f"{base}{expert}.gate_proj.weight"] = tensor[expert, :inter].contiguous()
            out[f"{base}{expert}.up_proj.weight"] = tensor[expert, inter:].contiguous()
        return out
    if name.endswith("mlp.experts.down_proj"):
        base = name[: -len("down_proj")]
        return {f"{base}{expert}.down_proj.weight": tensor[expert].contiguous() for expert in range(tensor.shape[0])}
    return {name: tensor}


def _layer_of(name):
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def write_sharded(hf_dir, tensors, num_shards):
    """Write `tensors` as official-style shards + index; layers in order, MTP layers (highest index) last."""
    from safetensors.torch import save_file

    order = sorted(tensors, key=lambda n: (n == "lm_head.weight", n != "model.embed_tokens.weight",
                                           _layer_of(n), n))
    num_shards = max(1, min(num_shards, len(order)))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    budget = total / num_shards
    groups, current, size = [], [], 0
    for name in order:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > budget and len(groups) < num_shards - 1:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map = {}
    for index, names in enumerate(groups):
        file_name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, os.path.join(hf_dir, file_name),
                  metadata={"format": "pt"})
        weight_map.update({n: file_name for n in names})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, handle,
                  indent=2)


def _write_official_style_config(hf_dir, kwargs):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", kwargs.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
    scaling["type"] = rope.get("rope_type", rope.get("type", "default"))
    config["rope_scaling"] = scaling if scaling["type"] != "default" else None
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# fp8 block quantisation, the way DeepSeek's release does it (independent torch reference for tests)
# ---------------------------------------------------------------------------------------------------------------

def is_fp8_quantised_in_release(name, ndim):
    """Whether the official release stores this tensor as fp8 + `<name>_scale_inv` (2-D linear weights only)."""
    return ndim == 2 and not name.endswith(_UNQUANTISED_SUFFIXES)


def torch_block_quantise(weight, block=FP8_BLOCK):
    """Reference of DeepSeek's `weight_quant`: per 128x128 block s = amax/448, q = fp8_e4m3fn(x / s), scale_inv = s.

    Computed in float32; ragged edge blocks use their own amax. Returns (fp8 tensor, float32 [ceil(M/b), ceil(N/b)]).
    """
    import torch

    x = weight.to(torch.float32)
    rows, cols = x.shape
    row_blocks, col_blocks = -(-rows // block), -(-cols // block)
    quantised = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(row_blocks, col_blocks, dtype=torch.float32)
    for i in range(row_blocks):
        for j in range(col_blocks):
            tile = x[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale = tile.abs().max() / FP8_MAX
            scale_inv[i, j] = scale
            quantised[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale).to(torch.float8_e4m3fn)
    return quantised, scale_inv


def torch_block_dequantise(quantised, scale_inv, block=FP8_BLOCK, out_dtype=None):
    """Reference of DeepSeek's `weight_dequant`: fp8 -> float32, times the block's float32 scale (float32 product),
    then cast to `out_dtype` (bf16 in the official tool)."""
    import torch

    x = quantised.to(torch.float32)
    scale = scale_inv.to(torch.float32).repeat_interleave(block, 0).repeat_interleave(block, 1)
    product = x * scale[: x.shape[0], : x.shape[1]]
    return product if out_dtype is None else product.to(out_dtype)


def quantise_checkpoint_fp8(src_dir, dst_dir):
    """Copy an HF directory, replacing every weight the release quantises by fp8 + `weight_scale_inv` (float32),
    keeping the other tensors in bf16 like the release; adds `quantization_config` to config.json.
    Returns {name: (fp8 tensor, scale_inv)} of the quantised weights, for exact comparisons."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(src_dir, "model.safetensors.index.json")) as handle:
        index = json.load(handle)
    quantised = {}
    new_map = {}
    for file_name in sorted(set(index["weight_map"].values())):
        out = {}
        for name, tensor in load_file(os.path.join(src_dir, file_name)).items():
            if is_fp8_quantised_in_release(name, tensor.dim()):
                q, s = torch_block_quantise(tensor)
                out[name], out[name + "_scale_inv"] = q, s
                quantised[name] = (q, s)
                new_map[name + "_scale_inv"] = file_name
            elif name.endswith("e_score_correction_bias"):
                out[name] = tensor.to(torch.float32)
            else:
                out[name] = tensor.to(torch.bfloat16)
            new_map[name] = file_name
        save_file(out, os.path.join(dst_dir, file_name), metadata={"format": "pt"})
    with open(os.path.join(dst_dir, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": dict(sorted(new_map.items()))}, handle, indent=2)
    with open(os.path.join(src_dir, "config.json")) as handle:
        config = json.load(handle)
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    config["torch_dtype"] = "bfloat16"
    with open(os.path.join(dst_dir, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    for extra in os.listdir(src_dir):
        if extra.startswith("tokenizer") or extra == "generation_config.json":
            shutil.copy(os.path.join(src_dir, extra), os.path.join(dst_dir, extra))
    return quantised


def hf_logits(model, input_ids):
    """float32 logits of a transformers model for a numpy/int token array [B, S]."""
    import torch

    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        return model(input_ids=ids, use_cache=False).logits.float().numpy()


def read_checkpoint_bits(directory):
    """{name: (stored dtype, stored bits)} of a safetensors checkpoint directory (for bit-exact comparisons)."""
    from mindpretrain.checkpoint.safetensors_io import open_safetensors, read_checkpoint_dir

    out = {}
    for name, path in read_checkpoint_dir(directory).items():
        with open_safetensors(path) as handle:
            out[name] = (handle.info(name)[0], np.array(handle.get_raw(name)))
    return out
