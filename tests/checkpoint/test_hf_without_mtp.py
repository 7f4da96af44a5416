"""HF checkpoints saved by transformers: config.json keeps `num_nextn_predict_layers: 1`, the MTP layer is absent.

References: the tiny checkpoint is written by transformers' own `save_pretrained` (tests/hf_reference.py without the
added MTP layer), its logits come from transformers, and the bits of the converted files are compared with the bits
transformers wrote. Each `--mtp` choice is exercised through the converter (function and command line) and
through `--load_checkpoint` (CheckpointManager.load_weights, run_mindformer.py's flag).
"""
import json
import os
import shutil
import types

import numpy as np
import pytest

from conftest import require_reference
from hf_reference import build_tiny_hf_deepseek_v3, hf_logits, read_checkpoint_bits as read_bits
from mindpretrain.checkpoint.conversion import ConversionError, NATIVE_MARKER, convert_hf_to_native
from mindpretrain.checkpoint.safetensors_io import read_checkpoint_dir
import research.deepseek3  # noqa: F401  (registers the DeepSeek-V3 model spec)

TOKENS = np.random.RandomState(3).randint(0, 512, size=(2, 10))
MTP_LAYER = "model.layers.3."          # the tiny model has 3 main layers: its MTP module is layer 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    require_reference("torch")
    require_reference("transformers")
    root = tmp_path_factory.mktemp("no_mtp")
    model, hf_dir = build_tiny_hf_deepseek_v3(root, add_mtp_layers=False)
    _, official_dir = build_tiny_hf_deepseek_v3(root / "official")
    return {"model": model, "hf_dir": hf_dir, "official": official_dir}


def test_transformers_checkpoint_really_lacks_mtp(saved):
    config = json.load(open(os.path.join(saved["hf_dir"], "config.json")))
    assert config["num_nextn_predict_layers"] == 1
    assert not any(name.startswith(MTP_LAYER) for name in read_checkpoint_dir(saved["hf_dir"]))


def test_require_refuses_and_names_what_is_missing(saved, tmp_path):
    with pytest.raises(ConversionError) as info:
        convert_hf_to_native(saved["hf_dir"], str(tmp_path / "out"), mtp="require")
    message = str(info.value)
    assert "no MTP weights (--mtp init or --mtp drop" in message
    assert f"{MTP_LAYER}eh_proj.weight" in message and f"{MTP_LAYER}mlp.experts.7.up_proj.weight" in message
    assert not (tmp_path / "out").exists()


def test_init_converts_without_mtp_and_keeps_the_config(saved, tmp_path):
    out = str(tmp_path / "native")
    summary = convert_hf_to_native(saved["hf_dir"], out, dtype="fp32")          # init is the default
    native, source = read_bits(out), read_bits(saved["hf_dir"])
    assert set(native) == set(source)
    for name, (dtype, bits) in native.items():
        np.testing.assert_array_equal(bits, source[name][1], err_msg=name)
    assert json.load(open(os.path.join(out, "config.json")))["num_nextn_predict_layers"] == 1
    marker = json.load(open(os.path.join(out, NATIVE_MARKER)))
    assert marker["source"]["mtp"] == "init" and "initial values" in marker["source"]["notes"][0]
    assert summary["num_tensors"] == len(source)


def test_drop_writes_a_model_without_mtp(saved, tmp_path):
    out = str(tmp_path / "native")
    convert_hf_to_native(saved["hf_dir"], out, dtype="fp32", mtp="drop")
    assert json.load(open(os.path.join(out, "config.json")))["num_nextn_predict_layers"] == 0
    assert set(read_bits(out)) == set(read_bits(saved["hf_dir"]))
    from_release = str(tmp_path / "from_release")          # the official layout: its MTP tensors are skipped
    convert_hf_to_native(saved["official"], from_release, dtype="fp32", mtp="drop")
    names = set(read_bits(from_release))
    assert not any(name.startswith(MTP_LAYER) for name in names) and "model.layers.2.mlp.gate.weight" in names
    assert json.load(open(os.path.join(from_release, "config.json")))["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize("mtp", ["require", "init", "drop"])
def test_official_layout_keeps_its_mtp_except_under_drop(saved, tmp_path, mtp):
    out = str(tmp_path / "native")
    convert_hf_to_native(saved["official"], out, dtype="fp32", mtp=mtp)
    has_mtp = any(name.startswith(MTP_LAYER + "eh_proj") for name in read_bits(out))
    assert has_mtp == (mtp != "drop")


@pytest.mark.parametrize("mtp", ["require", "init", "drop"])
def test_partial_mtp_is_refused_under_every_choice(saved, tmp_path, mtp):
    from safetensors.torch import load_file, save_file

    broken = str(tmp_path / "partial")
    shutil.copytree(saved["official"], broken)
    index_path = os.path.join(broken, "model.safetensors.index.json")
    index = json.load(open(index_path))
    victim = f"{MTP_LAYER}eh_proj.weight"
    shard = os.path.join(broken, index["weight_map"].pop(victim))
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard)
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ConversionError, match=r"missing[\s\S]*" + victim.replace(".", r"\.")):
        convert_hf_to_native(broken, str(tmp_path / "out"), mtp=mtp)


def test_unknown_choice_is_refused(saved, tmp_path):
    with pytest.raises(ConversionError, match=r"mtp \('keep'\) must be one of require, init, drop"):
        convert_hf_to_native(saved["hf_dir"], str(tmp_path / "out"), mtp="keep")


def test_command_line_flag(saved, tmp_path, capsys):
    from conftest import load_tool

    tool = load_tool("convert_hf_to_native")
    assert tool.main(["--hf-dir", saved["hf_dir"], "--output-dir", str(tmp_path / "r"), "--mtp", "require"]) == 1
    assert "--mtp init or --mtp drop" in capsys.readouterr().err
    assert tool.main(["--hf-dir", saved["hf_dir"], "--output-dir", str(tmp_path / "d"), "--mtp", "drop"]) == 0
    assert json.load(open(tmp_path / "d" / "config.json"))["num_nextn_predict_layers"] == 0
    assert tool.main(["--hf-dir", saved["hf_dir"], "--output-dir", str(tmp_path / "i")]) == 0
    assert json.load(open(tmp_path / "i" / "config.json"))["num_nextn_predict_layers"] == 1


# ------------------------------------------------------------------------------------------------------
# --load_checkpoint: CheckpointManager.load_weights with the run's load_checkpoint_mtp
# ------------------------------------------------------------------------------------------------------

def build_model(hf_dir, **overrides):
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    model_config = DeepseekV3Config.from_hf(hf_dir, compute_dtype="float32", param_init_type="float32",
                                            seq_length=TOKENS.shape[1], **overrides)
    return DeepseekV3ForCausalLM(model_config)


def manager(model, mtp=None):
    from mindpretrain.training.checkpoint import CheckpointManager

    params = dict(model.parameters_and_names())
    settings = types.SimpleNamespace(load_checkpoint_mtp=mtp or "init")    # RunSettings' default: init
    return CheckpointManager(settings, None, params, None, model=model, model_config=model.model_config)


def logits_of(model):
    import mindspore as ms

    model.set_train(False)
    return model(ms.Tensor(TOKENS, ms.int32)).asnumpy()


@pytest.fixture(scope="module")
def mtp_model(saved):
    return build_model(saved["hf_dir"])


def test_load_checkpoint_init_keeps_the_mtp_module_initial(saved, mtp_model):
    initial = {name: p.asnumpy().copy() for name, p in mtp_model.parameters_and_names() if name.startswith(MTP_LAYER)}
    assert initial
    manager(mtp_model).load_weights(saved["hf_dir"])                   # no --mtp: init
    after = dict(mtp_model.parameters_and_names())
    for name, value in initial.items():
        np.testing.assert_array_equal(after[name].asnumpy(), value, err_msg=name)
    assert np.abs(logits_of(mtp_model) - hf_logits(saved["model"], TOKENS)).max() <= 1e-4


def test_load_checkpoint_require_refuses(saved, mtp_model):
    from mindpretrain.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"missing[\s\S]*model\.layers\.3\.eh_proj\.weight"):
        manager(mtp_model, "require").load_weights(saved["hf_dir"])


def test_load_checkpoint_drop_needs_a_model_without_mtp(saved, mtp_model):
    from mindpretrain.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="--mtp drop: the YAML's model has multi-token prediction"):
        manager(mtp_model, "drop").load_weights(saved["hf_dir"])
    lean = build_model(saved["hf_dir"], num_nextn_predict_layers=0)
    manager(lean, "drop").load_weights(saved["hf_dir"])
    assert np.abs(logits_of(lean) - hf_logits(saved["model"], TOKENS)).max() <= 1e-4
    manager(lean, "drop").load_weights(saved["official"])            # its MTP layer is skipped
    with pytest.raises(CheckpointError, match=r"unexpected[\s\S]*model\.layers\.3\."):
        manager(lean, "init").load_weights(saved["official"])


def test_unknown_load_checkpoint_mtp_is_a_config_error():
    """Refused when the run's settings are read, before any model is built."""
    from mindpretrain.config import load_config
    from mindpretrain.training.settings import RunSettings
    from mindpretrain.validation import ConfigError

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "deepseek3",
                          "pretrain_deepseek3_tiny_cpu.yaml")
    assert RunSettings.from_config(load_config(config, ["+load_checkpoint_mtp=drop"])).load_checkpoint_mtp == "drop"
    with pytest.raises(ConfigError, match="load_checkpoint_mtp"):
        RunSettings.from_config(load_config(config, ["+load_checkpoint_mtp=sometimes"]))


def test_run_mindformer_flag_reaches_the_run_config():
    import run_mindformer

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "deepseek3",
                          "pretrain_deepseek3_tiny_cpu.yaml")
    _, run_config = run_mindformer.resolve_config(["--config", config, "--mtp", "drop", "--device_target", "CPU"])
    assert run_config["load_checkpoint_mtp"] == "drop"
    _, run_config = run_mindformer.resolve_config(["--config", config, "--device_target", "CPU"])
    assert "load_checkpoint_mtp" not in run_config
    with pytest.raises(SystemExit):
        run_mindformer.build_parser().parse_args(["--config", config, "--mtp", "maybe"])


def test_init_conversion_exports_back_to_what_transformers_saved(saved, tmp_path):
    from mindpretrain.checkpoint.conversion import convert_native_to_hf

    native, back = str(tmp_path / "native"), str(tmp_path / "back")
    convert_hf_to_native(saved["hf_dir"], native, dtype="fp32")                  # --mtp init
    convert_native_to_hf(native, back, dtype="fp32")
    exported, source = read_bits(back), read_bits(saved["hf_dir"])
    assert set(exported) == set(source)
    for name, (dtype, bits) in source.items():
        assert exported[name][0] == dtype, name
        np.testing.assert_array_equal(exported[name][1], bits, err_msg=name)
    assert json.load(open(os.path.join(back, "config.json")))["num_nextn_predict_layers"] == 1


def test_native_weights_missing_mtp_without_the_init_record_are_refused(saved, tmp_path):
    from mindpretrain.checkpoint.conversion import convert_native_to_hf

    native = str(tmp_path / "native")
    convert_hf_to_native(saved["hf_dir"], native, dtype="fp32")
    os.remove(os.path.join(native, NATIVE_MARKER))          # no record that the MTP layers were left out on purpose
    with pytest.raises(ConversionError, match=r"missing \(42\)[\s\S]*model\.layers\.3\.eh_proj\.weight"):
        convert_native_to_hf(native, str(tmp_path / "back"), dtype="fp32")
    assert not (tmp_path / "back").exists()
