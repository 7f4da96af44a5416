"""HF <-> native checkpoint conversion against independent references.

References: transformers' DeepseekV3ForCausalLM (logits, loading what we write), torch's float8_e4m3fn casts and
a torch re-implementation of DeepSeek's weight_quant / weight_dequant (`hf_reference.py`), and the bytes of the
source files. One tiny random model (with MTP layers, shapes > 128 for ragged fp8 blocks) is built per module.
"""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import require_reference
from hf_reference import (build_tiny_hf_deepseek_v3, hf_logits, is_fp8_quantised_in_release,
                          quantise_checkpoint_fp8, read_checkpoint_bits as read_bits, torch_block_dequantise,
                          torch_block_quantise)
from mindpretrain.checkpoint import fp8
from mindpretrain.checkpoint.conversion import (NATIVE_MARKER, ConversionError, convert_hf_to_native,
                                                convert_native_to_hf)
from mindpretrain.checkpoint.safetensors_io import open_safetensors, read_checkpoint_dir
import research.deepseek3  # noqa: F401  (registers the DeepSeek-V3 model spec the conversions find)

torch = transformers = None      # test-only references, imported by the autouse fixture below (skip if absent)

TOKENS = np.random.RandomState(7).randint(0, 512, size=(2, 12))


def torch_bits(tensor):
    """Stored bits of a torch tensor as numpy (bf16 -> uint16, fp8 -> uint8)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype == torch.float8_e4m3fn:
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


def leftovers(parent, name):
    return [entry for entry in os.listdir(parent) if entry.startswith(name)]


@pytest.fixture(scope="module", autouse=True)
def references():
    global torch, transformers
    torch = require_reference("torch")
    transformers = require_reference("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, references):
    root = tmp_path_factory.mktemp("conversion")
    model, hf_dir = build_tiny_hf_deepseek_v3(root)
    fp8_dir = str(root / "hf_fp8")
    quantised = quantise_checkpoint_fp8(hf_dir, fp8_dir)
    native32 = str(root / "native_fp32")
    convert_hf_to_native(hf_dir, native32, dtype="fp32", max_shard_size="300KB")
    return {"root": root, "model": model, "hf_dir": hf_dir, "fp8_dir": fp8_dir, "quantised": quantised,
            "native32": native32}


# ------------------------------------------------------------------------------------------------------
# fp8 codec
# ------------------------------------------------------------------------------------------------------

def test_e4m3_rounding_equals_torch_cast_including_ties():
    grid = fp8.E4M3_VALUES[:127]
    midpoints = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)   # exact ties
    rng = np.random.RandomState(0)
    values = np.concatenate([grid, midpoints, rng.uniform(-448, 448, 20000).astype(np.float32),
                             (rng.standard_normal(20000) * 0.01).astype(np.float32)])
    values = np.concatenate([values, -values])
    expected = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(fp8.float32_to_e4m3(values), expected)
    np.testing.assert_array_equal(fp8.e4m3_to_float32(expected), torch.from_numpy(expected).view(
        torch.float8_e4m3fn).float().numpy())


@pytest.mark.parametrize("shape", [(300, 257), (128, 128), (129, 1), (64, 160)])
def test_block_quantise_and_dequantise_equal_deepseek_reference(shape):
    rng = np.random.RandomState(sum(shape))
    weight = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    weight[:3, :3] *= 40                             # one block with a much larger range than the others
    codes, scales = fp8.quantise(weight)
    ref_codes, ref_scales = torch_block_quantise(torch.from_numpy(weight))
    assert scales.shape == (-(-shape[0] // 128), -(-shape[1] // 128)) and scales.dtype == np.float32
    np.testing.assert_array_equal(codes, torch_bits(ref_codes))
    np.testing.assert_array_equal(scales, ref_scales.numpy())
    np.testing.assert_array_equal(fp8.dequantise(codes, scales).view(np.uint32),
                                  torch_block_dequantise(ref_codes, ref_scales).numpy().view(np.uint32))
    np.testing.assert_array_equal(fp8.dequantise(codes, scales, "bfloat16"),
                                  torch_bits(torch_block_dequantise(ref_codes, ref_scales, out_dtype=torch.bfloat16)))
    assert np.abs(fp8.dequantise(codes, scales) - weight).max() <= np.abs(weight).max() / 14   # 3 mantissa bits


def test_degenerate_blocks():
    codes, scales = fp8.quantise(np.zeros((130, 5), np.float32))
    assert not codes.any() and np.all(scales == 1.0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        fp8.quantise(np.array([[1.0, np.inf]], np.float32))


# ------------------------------------------------------------------------------------------------------
# HF -> native
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fp8_release_dequantised_exactly_like_the_reference(tiny, tmp_path, dtype):
    out = str(tmp_path / "native")
    summary = convert_hf_to_native(tiny["fp8_dir"], out, dtype=dtype, max_shard_size="200KB", workers=2)
    native = read_bits(out)
    quantised = tiny["quantised"]
    assert summary["source"]["fp8_weights_dequantised"] == len(quantised) > 0
    ragged = [name for name, (q, _) in quantised.items() if any(dim > 128 and dim % 128 for dim in q.shape)]
    assert ragged, "the tiny model must have weights with ragged 128x128 edge blocks"
    out_dtype = torch.bfloat16 if dtype == "bf16" else None
    for name, (codes, scale_inv) in quantised.items():
        stored_dtype, bits = native[name]
        assert stored_dtype == ("BF16" if dtype == "bf16" else "F32"), name
        np.testing.assert_array_equal(bits, torch_bits(torch_block_dequantise(codes, scale_inv, out_dtype=out_dtype)),
                                      err_msg=name)
    source = read_bits(tiny["fp8_dir"])
    for name, (stored_dtype, bits) in native.items():
        if name in quantised:
            continue
        if name.endswith("e_score_correction_bias"):
            assert stored_dtype == "F32"
            np.testing.assert_array_equal(bits, source[name][1])
        elif dtype == "bf16":
            np.testing.assert_array_equal(bits, source[name][1], err_msg=name)    # bf16 passes through
        else:
            np.testing.assert_array_equal(bits.view(np.uint32) >> 16, source[name][1], err_msg=name)
    assert not any(name.endswith("_scale_inv") for name in native)
    marker = json.load(open(os.path.join(out, NATIVE_MARKER)))
    assert marker["source"]["duplicates_dropped"] == {
        "model.layers.3.embed_tokens.weight": "identical to model.embed_tokens.weight",
        "model.layers.3.shared_head.head.weight": "identical to lm_head.weight"}


def test_unquantised_conversion_keeps_every_tensor_and_mtp_layers(tiny):
    native, source = read_bits(tiny["native32"]), read_bits(tiny["hf_dir"])
    duplicates = {"model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"}
    assert set(native) == set(source) - duplicates
    for name, (dtype, bits) in native.items():
        assert dtype == "F32"
        np.testing.assert_array_equal(bits, source[name][1], err_msg=name)
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.hnorm.weight",
            "model.layers.3.shared_head.norm.weight", "model.layers.3.mlp.experts.7.down_proj.weight"} <= set(native)
    config = json.load(open(os.path.join(tiny["native32"], "config.json")))
    assert config["num_nextn_predict_layers"] == 1 and config["hidden_size"] == 64
    assert len([f for f in os.listdir(tiny["native32"]) if f.endswith(".safetensors")]) > 1


def test_our_model_on_converted_weights_matches_hf_logits(tiny):
    try:
        import mindspore as ms
        from research.deepseek3.deepseek3_config import DeepseekV3Config
        from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
    except ImportError as error:
        pytest.skip(f"the DeepSeek-V3 model is not available yet: {error}")
    cfg = DeepseekV3Config.from_hf(tiny["native32"], compute_dtype="float32", param_init_type="float32",
                                   seq_length=TOKENS.shape[1])
    model = DeepseekV3ForCausalLM(cfg)
    try:
        from research.deepseek3.hf_weights import load_hf_weights
        load_hf_weights(model, tiny["native32"])
    except ImportError:
        stored = {}
        for name, path in read_checkpoint_dir(tiny["native32"]).items():
            with open_safetensors(path) as handle:
                stored[name] = handle.get(name)
        params = dict(model.parameters_and_names())
        assert set(params) == set(stored)
        for name, param in params.items():
            param.set_data(ms.Tensor(stored[name], ms.float32))
    model.set_train(False)
    ours = model(ms.Tensor(TOKENS, ms.int32)).asnumpy()
    reference = hf_logits(tiny["model"], TOKENS)
    print("max |ours - HF| logits:", np.abs(ours - reference).max())
    assert np.abs(ours - reference).max() <= 1e-4


# ------------------------------------------------------------------------------------------------------
# native -> HF, round trips
# ------------------------------------------------------------------------------------------------------

def test_native_to_hf_loads_in_transformers_with_equal_logits(tiny, tmp_path):
    out = str(tmp_path / "hf_out")
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    convert_native_to_hf(tiny["native32"], out, dtype="fp32", tokenizer_dir=str(tokenizer_dir),
                         max_shard_size="400KB")
    files = sorted(os.listdir(out))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f"-of-{len(shards):05d}.safetensors" in f for f in shards)
    written, original = read_bits(out), read_bits(tiny["hf_dir"])
    assert set(written) == set(original)       # release layout, MTP copies of embedding/head included
    for name in original:
        np.testing.assert_array_equal(written[name][1], original[name][1], err_msg=name)
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_array_equal(hf_logits(loaded, TOKENS), hf_logits(tiny["model"], TOKENS))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_native_hf_native_round_trip_is_bitwise(tiny, tmp_path, dtype):
    first = str(tmp_path / "native_a")
    convert_hf_to_native(tiny["fp8_dir"] if dtype == "bf16" else tiny["hf_dir"], first, dtype=dtype)
    convert_native_to_hf(first, str(tmp_path / "hf"), dtype=dtype)
    convert_hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native_b"), dtype=dtype, max_shard_size="100KB")
    a, b = read_bits(first), read_bits(str(tmp_path / "native_b"))
    assert set(a) == set(b)
    for name in a:
        assert a[name][0] == b[name][0], name
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)


def test_fp8_export_quantises_like_the_release(tiny, tmp_path):
    native = str(tmp_path / "native")
    convert_hf_to_native(tiny["fp8_dir"], native, dtype="bf16")
    out = str(tmp_path / "hf_fp8")
    summary = convert_native_to_hf(native, out, quantise_fp8=True)
    written, native_bits, release = read_bits(out), read_bits(native), read_bits(tiny["fp8_dir"])
    assert set(written) == set(release)        # same names (scales included) as the release layout
    for name, (dtype, bits) in written.items():
        assert dtype == release[name][0], name
        if name.endswith("_scale_inv") or name not in tiny["quantised"]:
            continue
        weight = torch.from_numpy(native_bits[name][1].view(np.int16)).view(torch.bfloat16).float()
        ref_codes, ref_scales = torch_block_quantise(weight)
        np.testing.assert_array_equal(bits, torch_bits(ref_codes), err_msg=name)
        np.testing.assert_array_equal(written[name + "_scale_inv"][1], ref_scales.numpy(), err_msg=name)
    assert summary["fp8_quantised"] == len(tiny["quantised"])
    assert all(is_fp8_quantised_in_release(n, 2) == fp8.quantised_in_release(n, 2)
               for n in written if not n.endswith("_scale_inv"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}


def test_training_checkpoint_exports_without_optimizer_state(tiny, tmp_path):
    import yaml
    from hf_reference import tiny_config_kwargs

    from mindpretrain.checkpoint.safetensors_io import load_safetensors, save_safetensors

    step = tmp_path / "step_00000010"
    step.mkdir()
    weights = {}
    for name, path in read_checkpoint_dir(tiny["native32"]).items():
        with open_safetensors(path) as handle:
            weights[name] = handle.get(name)
    save_safetensors(str(step / "model.safetensors"), weights)
    save_safetensors(str(step / "optimizer.safetensors"),
                     {"optimizer.exp_avg." + n: np.zeros_like(v) for n, v in list(weights.items())[:3]})
    model_config = dict(tiny_config_kwargs(), type="DeepseekV3Config")
    (step / "config.yaml").write_text(yaml.safe_dump({"model": {"model_config": model_config}}))
    out = str(tmp_path / "hf")
    convert_native_to_hf(str(step), out, dtype="fp32")
    written = read_bits(out)
    assert not any(name.startswith("optimizer.") for name in written)
    np.testing.assert_array_equal(written["model.layers.3.shared_head.head.weight"][1], weights["lm_head.weight"])
    assert load_safetensors  # imported API used above through save_safetensors


# ------------------------------------------------------------------------------------------------------
# Refusals leave nothing behind
# ------------------------------------------------------------------------------------------------------

def copy_checkpoint(source, target):
    shutil.copytree(source, target)
    return str(target)


def assert_refused(source, tmp_path, *expected_fragments):
    out = tmp_path / "refused"
    with pytest.raises(ConversionError) as info:
        convert_hf_to_native(source, str(out))
    message = str(info.value)
    for fragment in expected_fragments:
        assert fragment in message, message
    assert not out.exists() and not leftovers(tmp_path, "refused")
    return message


def test_mismatched_config_lists_the_offending_tensors(tiny, tmp_path):
    broken = copy_checkpoint(tiny["hf_dir"], tmp_path / "src")
    config_path = os.path.join(broken, "config.json")
    config = json.load(open(config_path))
    config["n_routed_experts"] = 4
    json.dump(config, open(config_path, "w"))
    message = assert_refused(broken, tmp_path, "unexpected", "model.layers.1.mlp.experts.4.gate_proj.weight",
                             "model.layers.2.mlp.experts.7.down_proj.weight", "wrong shape",
                             "model.layers.1.mlp.gate.weight: [8, 64] in the checkpoint, [4, 64] expected",
                             "model.layers.3.mlp.gate.e_score_correction_bias")
    assert "n_routed_experts=4" in message


def test_missing_tensor_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = copy_checkpoint(tiny["hf_dir"], tmp_path / "src")
    index = json.load(open(os.path.join(broken, "model.safetensors.index.json")))
    victim = "model.layers.2.self_attn.kv_b_proj.weight"
    shard = os.path.join(broken, index["weight_map"][victim])
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard)
    assert_refused(broken, tmp_path, "listed in the index but absent", victim)
    del index["weight_map"][victim]
    json.dump(index, open(os.path.join(broken, "model.safetensors.index.json"), "w"))
    assert_refused(broken, tmp_path, "missing", victim)


def test_truncated_shard_is_refused(tiny, tmp_path):
    broken = copy_checkpoint(tiny["hf_dir"], tmp_path / "src")
    last = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[-1]
    path = os.path.join(broken, last)
    os.truncate(path, os.path.getsize(path) - 1000)
    assert_refused(broken, tmp_path, "truncated", last)


def test_failure_while_writing_leaves_no_output(tiny, tmp_path, monkeypatch):
    from mindpretrain.checkpoint import conversion_io

    calls = {"n": 0}
    original = conversion_io.write_job

    def failing(readers, writer, job):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk full (simulated)")
        return original(readers, writer, job)

    monkeypatch.setattr(conversion_io, "write_job", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_native(tiny["hf_dir"], str(out), max_shard_size="100KB")
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_existing_output_is_not_overwritten(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_hf_to_native(tiny["hf_dir"], str(out))
    assert os.listdir(out) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------------

def test_command_lines(tiny, tmp_path, capsys):
    from conftest import load_tool

    to_native, to_hf = load_tool("convert_hf_to_native"), load_tool("convert_native_to_hf")
    assert to_native.main(["--hf-dir", tiny["fp8_dir"], "--output-dir", str(tmp_path / "n"), "--workers", "2",
                           "--max-shard-size", "200KB"]) == 0
    assert to_hf.main(["--checkpoint", str(tmp_path / "n"), "--output-dir", str(tmp_path / "h"), "--fp8"]) == 0
    assert json.load(open(tmp_path / "h" / "config.json"))["quantization_config"]["quant_method"] == "fp8"
    broken = copy_checkpoint(tiny["hf_dir"], tmp_path / "src")
    config = json.load(open(os.path.join(broken, "config.json")))
    config["hidden_size"] = 32
    json.dump(config, open(os.path.join(broken, "config.json"), "w"))
    assert to_native.main(["--hf-dir", broken, "--output-dir", str(tmp_path / "x")]) == 1
    error = capsys.readouterr().err
    assert "wrong shape" in error and "model.embed_tokens.weight: [512, 64] in the checkpoint, [512, 32]" in error
    assert not (tmp_path / "x").exists()
