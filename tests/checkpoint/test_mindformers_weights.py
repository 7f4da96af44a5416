"""DeepSeek-V3 weights saved by MindFormers under its own names load and convert to the same model.

The reference is an independent re-expression of a tiny transformers checkpoint in MindFormers' names, written
here in torch from MindFormers' documented HF -> MindSpore conversion (`research/deepseek3/convert_weight.py`:
renames, per-head split of q_b_proj and kv_b_proj, split of kv_a_proj_with_mqa, the rope rows of each head
reordered evens-then-odds, experts stacked per layer, transposed for grouped matmul; MTP names as its
`convert_reversed.py` reads them). It runs in the HF -> MindFormers direction, the code under test in the other.
Both the loader (`--load_checkpoint`: CheckpointManager.load_weights -> spec.load_hf_weights) and the converter
must give the tensors, and so the logits, of the HF checkpoint.
"""
import json
import os
import shutil
import types

import numpy as np
import pytest

from conftest import require_reference
from hf_reference import TINY_CONFIG, build_tiny_hf_deepseek_v3, hf_logits, read_checkpoint_bits as read_bits
from mindpretrain.checkpoint.conversion import ConversionError, NATIVE_MARKER, convert_hf_to_native
from mindpretrain.checkpoint.safetensors_io import read_checkpoint_dir
from mindpretrain.model_spec import spec_for_model_type
import research.deepseek3  # noqa: F401  (registers the DeepSeek-V3 model spec)

TOKENS = np.random.RandomState(5).randint(0, 512, size=(2, 10))
HEADS, NOPE, ROPE, V_DIM = (TINY_CONFIG[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                                    "v_head_dim"))
LAYERS, EXPERTS, DENSE = TINY_CONFIG["num_hidden_layers"], TINY_CONFIG["n_routed_experts"], 1


# ------------------------------------------------------------------------------------------------------
# The independent re-expression (HF -> MindFormers), after MindFormers' convert_weight.py
# ------------------------------------------------------------------------------------------------------

def rope_evens_then_odds(rows, heads):
    """convert_weight.py: q rope rows reshape(h, r/2, 2, -1).permute(0, 2, 1, 3); k_pe the same with h = 1."""
    return rows.reshape(heads, ROPE // 2, 2, -1).permute(0, 2, 1, 3).reshape(heads * ROPE, -1)


def mindformers_attention(hf, layer):
    src, dst = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.attention."
    out = {}
    q_nope, q_rope = hf[src + "q_b_proj.weight"].reshape(HEADS, NOPE + ROPE, -1).split([NOPE, ROPE], dim=1)
    out[dst + "l2q_nope_proj.weight"] = q_nope.reshape(HEADS * NOPE, -1)
    out[dst + "l2q_pe_proj.weight"] = rope_evens_then_odds(q_rope, HEADS)
    kv_a = hf[src + "kv_a_proj_with_mqa.weight"]
    latent, k_pe = kv_a.split([kv_a.shape[0] - ROPE, ROPE], dim=0)
    out[dst + "kv2l_latent_kv.weight"] = latent
    out[dst + "kv2l_k_pe.weight"] = rope_evens_then_odds(k_pe, 1)
    k_nope, value = hf[src + "kv_b_proj.weight"].reshape(HEADS, NOPE + V_DIM, -1).split([NOPE, V_DIM], dim=1)
    out[dst + "lkv2kv_k_nope.weight"] = k_nope.reshape(HEADS * NOPE, -1)
    out[dst + "lkv2kv_v.weight"] = value.reshape(HEADS * V_DIM, -1)
    for ours, theirs in (("q_a_proj", "q2l_proj"), ("q_a_layernorm", "lq_norm"), ("kv_a_layernorm", "lkv_norm"),
                         ("o_proj", "wo")):
        out[f"{dst}{theirs}.weight"] = hf[f"{src}{ours}.weight"]
    out[f"model.layers.{layer}.attention_norm.weight"] = hf[f"model.layers.{layer}.input_layernorm.weight"]
    out[f"model.layers.{layer}.ffn_norm.weight"] = hf[f"model.layers.{layer}.post_attention_layernorm.weight"]
    return out


def mindformers_mlp(hf, layer, experts):
    """experts: "bmm" (convert_weight.py default, [E, out, in] `.weight`), "gmm" (--use_gemm: [E, in, out]),
    "moev3" (MoEV3's parameters: [E, in, out], no `.weight`, router_dense / topk_bias), "fused" (gate and up in
    one `ffn.w1`, as convert_reversed.py splits it)."""
    import torch

    src, dst = f"model.layers.{layer}.mlp.", f"model.layers.{layer}.feed_forward."
    if layer < DENSE:
        return {f"{dst}{w}.weight": hf[f"{src}{p}.weight"] for p, w in (("gate_proj", "w1"), ("down_proj", "w2"),
                                                                          ("up_proj", "w3"))}
    out = {f"{dst}shared_experts.{w}.weight": hf[f"{src}shared_experts.{p}.weight"]
           for p, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))}
    if experts in ("moev3", "fused"):
        out[dst + "routed_experts.router_dense.weight"] = hf[src + "gate.weight"]
        out[dst + "routed_experts.topk_bias"] = hf[src + "gate.e_score_correction_bias"]
        out[dst + "routed_experts.expert_load"] = torch.zeros(EXPERTS)            # a training buffer
    else:
        out[dst + "routed_experts.router.dense.weight"] = hf[src + "gate.weight"]
        out[dst + "routed_experts.router.router.topk_bias"] = hf[src + "gate.e_score_correction_bias"]
    stacked = {w: torch.stack([hf[f"{src}experts.{e}.{proj}.weight"] for e in range(EXPERTS)], 0)
               for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))}
    if experts == "fused":                # convert_reversed.py's grouped-matmul form: ffn.w1 = [gate | up] [E, H, 2I]
        out[dst + "routed_experts.ffn.w1"] = torch.cat([stacked["w1"].transpose(1, 2), stacked["w3"].transpose(1, 2)],
                                                       dim=-1).contiguous()
        out[dst + "routed_experts.ffn.w2"] = stacked["w2"].transpose(1, 2).contiguous()
        return out
    for w, tensor in stacked.items():
        if experts != "bmm":
            tensor = tensor.transpose(1, 2)
        out[f"{dst}routed_experts.ffn.{w}" + ("" if experts == "moev3" else ".weight")] = tensor.contiguous()
    return out


def to_mindformers(hf, experts="bmm", with_mtp=True):
    out = {"model.tok_embeddings.embedding_weight": hf["model.embed_tokens.weight"],
           "model.norm_out.weight": hf["model.norm.weight"], "lm_head.weight": hf["lm_head.weight"]}
    for layer in range(LAYERS + (1 if with_mtp else 0)):
        out.update(mindformers_attention(hf, layer))
        out.update(mindformers_mlp(hf, layer, experts))
    if with_mtp:
        mtp = f"model.layers.{LAYERS}."
        out.update({"model.mtp_hidden_fusers.0.norm_emb.weight": hf[mtp + "enorm.weight"],
                    "model.mtp_hidden_fusers.0.norm.weight": hf[mtp + "hnorm.weight"],
                    "model.mtp_hidden_fusers.0.dense.weight": hf[mtp + "eh_proj.weight"],
                    "model.mtp_norms.0.weight": hf[mtp + "shared_head.norm.weight"]})
    return {name: tensor.contiguous() for name, tensor in out.items()}


def write_mindformers_dir(hf_dir, target, experts="bmm", dtype=None, extra=None):
    """MindFormers-named shards (one per layer, as convert_weight.py writes, no HF index), optimizer state
    included as MindFormers' checkpoints hold it; config.json copied for the converter."""
    import torch
    from safetensors.torch import load_file, save_file

    hf = {}
    for path in set(read_checkpoint_dir(hf_dir).values()):
        hf.update(load_file(path))
    tensors = to_mindformers(hf, experts)
    tensors["adam_m.model.norm_out.weight"] = torch.zeros_like(tensors["model.norm_out.weight"])
    tensors["global_step"] = torch.tensor([12], dtype=torch.int32)
    tensors.update(extra or {})
    if dtype is not None:
        tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    os.makedirs(target)
    groups = {}
    for name in tensors:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "other"
        groups.setdefault(layer, {})[name] = tensors[name]
    for index, group in enumerate(sorted(groups)):
        save_file(groups[group], os.path.join(target, f"ms-model-{index + 1:05d}-of-{len(groups):05d}.safetensors"))
    shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(target, "config.json"))
    return str(target)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    require_reference("torch")
    require_reference("transformers")
    root = tmp_path_factory.mktemp("mindformers")
    model, hf_dir = build_tiny_hf_deepseek_v3(root)
    layouts = {kind: write_mindformers_dir(hf_dir, root / f"mf_{kind}", kind) for kind in ("bmm", "gmm", "moev3", "fused")}
    return {"root": root, "model": model, "hf_dir": hf_dir, "mf": layouts}


# ------------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------------

def test_layout_is_detected_from_the_names(tiny):
    spec = spec_for_model_type("deepseek_v3")
    assert spec.foreign_layout_of(list(read_checkpoint_dir(tiny["mf"]["bmm"]))).name == "MindFormers"
    assert spec.foreign_layout_of(list(read_checkpoint_dir(tiny["hf_dir"]))) is None
    assert spec.foreign_layout_of(["model.layers.0.attention.q2l_proj.weight"]).name == "MindFormers"


# ------------------------------------------------------------------------------------------------------
# --load_checkpoint
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny):
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    model_config = DeepseekV3Config.from_hf(tiny["hf_dir"], compute_dtype="float32", param_init_type="float32",
                                            seq_length=TOKENS.shape[1])
    return DeepseekV3ForCausalLM(model_config)


def load(model, path):
    from mindpretrain.training.checkpoint import CheckpointManager

    params = dict(model.parameters_and_names())
    CheckpointManager(types.SimpleNamespace(load_checkpoint_mtp="require"), None, params, None,
                      model=model, model_config=model.model_config).load_weights(path)
    return {name: param.asnumpy().copy() for name, param in params.items()}


@pytest.fixture(scope="module")
def from_hf(tiny, model):
    return load(model, tiny["hf_dir"])


@pytest.mark.parametrize("experts", ["bmm", "gmm", "moev3", "fused"])
def test_mindformers_checkpoint_loads_the_same_tensors(tiny, model, from_hf, experts):
    loaded = load(model, tiny["mf"][experts])
    assert set(loaded) == set(from_hf)
    for name, value in from_hf.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_mindformers_checkpoint_gives_the_hf_logits(tiny, model):
    import mindspore as ms

    load(model, tiny["mf"]["bmm"])
    model.set_train(False)
    ours = model(ms.Tensor(TOKENS, ms.int32)).asnumpy()
    difference = np.abs(ours - hf_logits(tiny["model"], TOKENS)).max()
    print("max |ours(MindFormers weights) - HF| logits:", difference)
    assert difference <= 1e-4


def test_mindformers_checkpoint_with_a_wrong_tensor_is_refused_whole(tiny, model, tmp_path):
    import torch
    from mindpretrain.training.checkpoint import CheckpointError

    before = {name: p.asnumpy().copy() for name, p in model.parameters_and_names()}
    broken = write_mindformers_dir(tiny["hf_dir"], tmp_path / "broken", extra={
        "model.layers.1.attention.l2q_pe_proj.weight": torch.zeros(HEADS * ROPE + 2, TINY_CONFIG["q_lora_rank"]),
        "model.layers.1.attention.mystery.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError) as info:
        load(model, broken)
    message = str(info.value)
    assert "model.layers.1.attention.l2q_pe_proj.weight: [34, 32] in the checkpoint, [32, 32] expected" in message
    assert "model.layers.1.attention.mystery.weight (a MindFormers name" in message
    for name, param in model.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), before[name], err_msg=name)


# ------------------------------------------------------------------------------------------------------
# The converter
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts", ["bmm", "moev3"])
def test_converter_writes_what_the_hf_checkpoint_converts_to(tiny, tmp_path, experts):
    reference, ours = str(tmp_path / "from_hf"), str(tmp_path / "from_mf")
    convert_hf_to_native(tiny["hf_dir"], reference, dtype="fp32", mtp="require")
    convert_hf_to_native(tiny["mf"][experts], ours, dtype="fp32", mtp="require", workers=2, max_shard_size="200KB")
    expected, written = read_bits(reference), read_bits(ours)
    assert set(written) == set(expected)
    for name, (dtype, bits) in expected.items():
        assert written[name][0] == dtype, name
        np.testing.assert_array_equal(written[name][1], bits, err_msg=name)
    marker = json.load(open(os.path.join(ours, NATIVE_MARKER)))
    assert marker["source"]["layout"] == "MindFormers"


def test_bf16_mindformers_checkpoint_converts_bit_for_bit(tiny, tmp_path):
    import torch

    mf = write_mindformers_dir(tiny["hf_dir"], tmp_path / "mf_bf16", dtype=torch.bfloat16)
    hf_bf16 = str(tmp_path / "hf_bf16")
    convert_hf_to_native(tiny["hf_dir"], hf_bf16, dtype="bf16")
    convert_hf_to_native(mf, str(tmp_path / "from_mf"), dtype="bf16")
    expected, written = read_bits(hf_bf16), read_bits(str(tmp_path / "from_mf"))
    for name, (dtype, bits) in expected.items():
        if dtype == "BF16":                   # the expert bias is kept fp32 (from bf16 storage here: not compared)
            np.testing.assert_array_equal(written[name][1], bits, err_msg=name)


def test_converter_refuses_an_unknown_mindformers_name(tiny, tmp_path):
    import torch

    broken = write_mindformers_dir(tiny["hf_dir"], tmp_path / "broken",
                                   extra={"model.layers.0.feed_forward.w4.weight": torch.zeros(2, 2)})
    with pytest.raises(ConversionError, match=r"unexpected \(a MindFormers name[\s\S]*feed_forward\.w4\.weight"):
        convert_hf_to_native(broken, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# MindSpore .ckpt files (CheckpointMonitor with checkpoint_format: ckpt)
# ------------------------------------------------------------------------------------------------------

def write_mindformers_ckpt(hf_dir, checkpoint_dir, step, dtype=None, scale=1.0):
    """One rank's save as MindFormers' CheckpointMonitor lays it out:
    checkpoint/rank_0/deepseekv3_rank_0-1_<step>.ckpt, weights (x `scale`) and optimizer state under its names."""
    import mindspore as ms
    from safetensors.torch import load_file

    hf = {}
    for path in set(read_checkpoint_dir(hf_dir).values()):
        hf.update(load_file(path))
    tensors = to_mindformers(hf, "bmm")
    rank_dir = os.path.join(checkpoint_dir, "rank_0")
    os.makedirs(rank_dir, exist_ok=True)
    records = []
    for name, tensor in tensors.items():
        value = ms.Tensor(tensor.float().numpy() * scale)
        records.append({"name": name, "data": value.astype(dtype) if dtype is not None else value})
    records.append({"name": "adam_m.model.norm_out.weight", "data": ms.Tensor(np.zeros(TINY_CONFIG["hidden_size"],
                                                                                        np.float32))})
    records.append({"name": "global_step", "data": ms.Tensor(np.array([step], np.int32))})
    path = os.path.join(rank_dir, f"deepseekv3_rank_0-1_{step}.ckpt")
    ms.save_checkpoint(records, path)
    return path


@pytest.fixture(scope="module")
def ckpt_run(tiny):
    """A MindFormers output folder with two saves; the older one holds other values (the newest must win)."""
    checkpoint_dir = str(tiny["root"] / "mf_ckpt" / "checkpoint")
    write_mindformers_ckpt(tiny["hf_dir"], checkpoint_dir, step=1, scale=0.5)
    newest = write_mindformers_ckpt(tiny["hf_dir"], checkpoint_dir, step=2)
    os.utime(newest, (1, 1))        # older on disk than step 1: the choice is by the step in the name
    return checkpoint_dir, newest


def test_mindspore_ckpt_loads_the_newest_save_as_the_hf_tensors(model, from_hf, ckpt_run):
    checkpoint_dir, newest = ckpt_run
    for location in (checkpoint_dir, os.path.dirname(newest), newest):
        loaded = load(model, location)
        assert set(loaded) == set(from_hf)
        for name, value in from_hf.items():
            np.testing.assert_array_equal(loaded[name], value, err_msg=f"{location}: {name}")


def test_bf16_mindspore_ckpt_converts_bit_for_bit(tiny, tmp_path):
    import mindspore as ms

    path = write_mindformers_ckpt(tiny["hf_dir"], str(tmp_path / "ckpt"), step=3, dtype=ms.bfloat16)
    source = os.path.dirname(path)
    shutil.copy(os.path.join(tiny["hf_dir"], "config.json"), os.path.join(source, "config.json"))
    hf_bf16 = str(tmp_path / "hf_bf16")
    convert_hf_to_native(tiny["hf_dir"], hf_bf16, dtype="bf16")
    convert_hf_to_native(source, str(tmp_path / "from_ckpt"), dtype="bf16")
    expected, written = read_bits(hf_bf16), read_bits(str(tmp_path / "from_ckpt"))
    compared = 0
    for name, (dtype, bits) in expected.items():
        if dtype == "BF16":
            np.testing.assert_array_equal(written[name][1], bits, err_msg=name)
            compared += 1
    assert compared > 10


def test_per_rank_ckpt_shards_are_refused_with_the_way_out(tiny, model, tmp_path):
    from mindpretrain.training.checkpoint import CheckpointError
    from mindpretrain.checkpoint.safetensors_io import SafetensorsError

    checkpoint_dir = str(tmp_path / "checkpoint")
    write_mindformers_ckpt(tiny["hf_dir"], checkpoint_dir, step=1)
    os.makedirs(os.path.join(checkpoint_dir, "rank_1"))
    with pytest.raises((CheckpointError, SafetensorsError), match=r"rank_0, rank_1.*integrated_save: True"):
        load(model, checkpoint_dir)


def test_a_corrupt_ckpt_is_named(model, tmp_path):
    from mindpretrain.training.checkpoint import CheckpointError
    from mindpretrain.checkpoint.safetensors_io import SafetensorsError

    broken = tmp_path / "deepseekv3_rank_0-1_2.ckpt"
    broken.write_bytes(b"\x08\x01not a protobuf checkpoint")
    with pytest.raises((CheckpointError, SafetensorsError), match=r"cannot read MindSpore checkpoint .*\.ckpt"):
        load(model, str(tmp_path))
