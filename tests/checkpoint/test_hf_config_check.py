"""Fine-tuning from HF weights checks that the checkpoint's config.json describes the YAML's model.

The checkpoint is the tiny transformers DeepSeek-V3 (tests/hf_reference.py) with YaRN rope scaling, in the
official release's config style and in transformers' own (`rope_parameters`): both must match a YAML model
built from the same values, and a YAML that drops the rope scaling or changes the routing scale must be refused
with the key named and no parameter touched. Shapes alone would not catch either.
"""
import numpy as np
import pytest

from conftest import require_reference
from hf_reference import build_tiny_hf_deepseek_v3, tiny_config_kwargs
from mindpretrain.checkpoint.hf_config_check import hf_config_differences
from mindpretrain.model_spec import spec_for_config
import research.deepseek3  # noqa: F401  (registers the DeepSeek-V3 model spec)
from research.deepseek3.deepseek3_config import DeepseekV3Config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    require_reference("torch")
    require_reference("transformers")
    root = tmp_path_factory.mktemp("hf_config")
    _, official = build_tiny_hf_deepseek_v3(root / "official", config_style="official")
    _, transformers_style = build_tiny_hf_deepseek_v3(root / "transformers", config_style="transformers")
    return {"official": official, "transformers": transformers_style}


def yaml_model_config(**overrides):
    """What a YAML with the tiny model's values builds (training fields differ from config.json's on purpose)."""
    kwargs = tiny_config_kwargs(**overrides)
    kwargs.pop("num_key_value_heads")
    kwargs.update(initializer_range=0.02, max_position_embeddings=128)      # ignored keys: may differ
    return DeepseekV3Config(**kwargs, seq_length=32, compute_dtype="float32")


@pytest.mark.parametrize("style", ["official", "transformers"])
def test_the_same_model_has_no_differences(checkpoints, style):
    model_config = yaml_model_config()
    assert hf_config_differences(spec_for_config(model_config), model_config, checkpoints[style]) == []


def test_rope_scaling_and_routing_scale_are_named(checkpoints):
    model_config = yaml_model_config(rope_scaling=None, routed_scaling_factor=1.0)
    differences = hf_config_differences(spec_for_config(model_config), model_config, checkpoints["official"])
    assert [line.split(":")[0] for line in differences] == ["rope_scaling", "routed_scaling_factor"]
    assert "YAML null vs checkpoint {" in differences[0] and '"factor": 4.0' in differences[0]
    assert differences[1] == "routed_scaling_factor: YAML 1.0 vs checkpoint 2.5"


def test_load_weights_refuses_another_model_and_loads_nothing(checkpoints):
    from mindpretrain.training.checkpoint import CheckpointError, CheckpointManager
    from mindpretrain.training.settings import RunSettings
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(yaml_model_config(norm_topk_prob=False))
    params = dict(model.parameters_and_names())
    before = {name: param.asnumpy().copy() for name, param in params.items()}
    settings = RunSettings(seq_length=32)
    manager = CheckpointManager(settings, None, params, None, model=model, model_config=model.model_config)
    with pytest.raises(CheckpointError, match=r"norm_topk_prob: YAML false vs checkpoint true.*Nothing was loaded"):
        manager.load_weights(checkpoints["official"])
    for name, param in params.items():
        np.testing.assert_array_equal(param.asnumpy(), before[name], err_msg=name)
    matching = DeepseekV3ForCausalLM(yaml_model_config())
    matching_params = dict(matching.parameters_and_names())
    CheckpointManager(settings, None, matching_params, None, model=matching,
                      model_config=matching.model_config).load_weights(checkpoints["official"])
    from hf_reference import read_checkpoint_bits

    _, released = read_checkpoint_bits(checkpoints["official"])["model.embed_tokens.weight"]
    np.testing.assert_array_equal(matching_params["model.embed_tokens.weight"].asnumpy().view(np.uint32),
                                  np.asarray(released).view(np.uint32))
