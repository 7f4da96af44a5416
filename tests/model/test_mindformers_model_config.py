"""MindFormers' published DeepSeek-V3 YAMLs (tests/data/mindformers/) build a DeepseekV3Config as they are: every
key of its model vocabulary is honoured or reported as a no-op, per-stage recompute lands on the right layers,
aux_loss_types/factors and TopkBiasBalanceCallback keep MindFormers' meaning, typos still fail."""
import copy

import pytest

from mindpretrain import registry
from mindpretrain.config import load_config
from mindpretrain.model_builder import build_model_config
from mindpretrain.validation import ConfigError
from conftest import PROJECT_ROOT

DATA = PROJECT_ROOT / "tests/data/mindformers"
PUBLISHED = ("pretrain_deepseek3_671b.yaml", "finetune_deepseek3_671b.yaml", "pretrain_deepseek3_1b_guide.yaml")


@pytest.fixture(scope="module", autouse=True)
def deepseek3_registered():
    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))


def run_config(name):
    return load_config(str(DATA / name))


def small_run_config(**recompute_config):
    """9 decoder layers + 1 MTP block over 4 stages, offset [1, 1, 0, 0]: stages hold [0-2], [3-5], [6-7], [8-9]."""
    return {
        "model": {"model_config": dict(type="DeepseekV3Config", num_layers=9, mtp_depth=1, hidden_size=32,
                                       num_heads=2, n_kv_heads=4, intermediate_size=48, kv_lora_rank=8,
                                       q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                       vocab_size=96, seq_length=16, offset=[1, 1, 0, 0]),
                  "arch": {"type": "DeepseekV3ForCausalLM"}},
        "moe_config": dict(expert_num=4, num_experts_chosen=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                           first_k_dense_replace=1),
        "parallel_config": dict(data_parallel=1, model_parallel=1, pipeline_stage=4, micro_batch_num=4),
        "recompute_config": recompute_config,
    }


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_yaml_builds(name):
    model_config = build_model_config(run_config(name))
    raw = run_config(name)
    assert model_config.num_hidden_layers == raw["model"]["model_config"]["num_layers"]
    assert model_config.n_routed_experts == raw["moe_config"]["expert_num"]
    assert model_config.num_attention_heads == raw["model"]["model_config"]["num_heads"]
    assert model_config.num_key_value_heads == model_config.num_attention_heads      # n_kv_heads 128 ignored (MLA)
    assert model_config.num_nextn_predict_layers == raw["model"]["model_config"]["mtp_depth"]
    assert model_config.seq_balance_loss_alpha == raw["moe_config"]["aux_loss_factors"][0]
    assert model_config.topk_bias_update_rate == raw["moe_config"]["topk_bias_update_rate"]


def test_no_effect_keys_are_run_yaml_paths_of_the_no_op_keys_only():
    keys = build_model_config(run_config("pretrain_deepseek3_671b.yaml")).no_effect_keys
    assert len(keys) == len(set(keys))
    for expected in ("model.model_config.use_fused_rope", "model.model_config.input_sliced_sig",
                     "model.model_config.n_kv_heads", "moe_config.use_gmm", "moe_config.aux_loss_factor",
                     "moe_config.capacity_factor", "recompute_config.mp_comm_recompute",
                     "recompute_config.recompute_slice_activation"):
        assert expected in keys
    for honoured in ("model.model_config.type", "model.model_config.num_layers", "moe_config.expert_num",
                     "moe_config.aux_loss_types", "moe_config.expert_model_parallel", "moe_config.n_group",
                     "model.model_config.extend_method", "recompute_config.recompute"):
        assert honoured not in keys


def test_671b_per_stage_recompute_lands_on_the_first_layers_of_each_stage():
    """recompute [3, 4 x 12, 3, 2, 0] over 16 stages of 4 layers (offset [1]*15 + [-1]; the last stage holds
    decoder layer 60 and the MTP block 61), written out by hand."""
    modes = build_model_config(run_config("pretrain_deepseek3_671b.yaml")).recompute
    full = [0, 1, 2] + list(range(4, 52)) + [52, 53, 54] + [56, 57]
    assert modes == tuple("full" if layer in full else "none" for layer in range(62))


def test_four_stage_recompute_and_select_recompute_by_hand():
    config = small_run_config(recompute=[2, True, 0, 5], select_recompute=[1, 1, 1, 1])
    modes = build_model_config(config).recompute
    #            stage 0 [0-2]         stage 1 [3-5]         stage 2 [6-7]    stage 3 [8-9] (5 clamped to 2)
    assert modes == ("full", "full", "none", "full", "full", "full", "selective", "none", "full", "full")


def test_bool_pattern_and_per_layer_forms_still_work():
    assert set(build_model_config(small_run_config(recompute=True)).recompute) == {"full"}
    assert set(build_model_config(small_run_config(recompute=False, select_recompute=True)).recompute) == {
        "selective"}
    patterns = small_run_config(select_recompute=[r"feed_forward\.mul", r"feed_forward\.w1\.activation\.silu"])
    assert set(build_model_config(patterns).recompute) == {"selective"}
    by_pattern = small_run_config(select_recompute={r"feed_forward\.mul": [0, 0, 2, 0]})
    assert build_model_config(by_pattern).recompute == ("none",) * 6 + ("selective",) * 2 + ("none",) * 2
    per_layer = ["full"] * 3 + ["none"] * 7
    assert build_model_config(small_run_config(recompute=per_layer)).recompute == tuple(per_layer)


def test_per_stage_list_of_the_wrong_length_is_refused():
    with pytest.raises(ConfigError, match=r"recompute_config\.recompute .*one entry per pipeline stage"):
        build_model_config(small_run_config(recompute=[1, 1, 1]))


def test_typo_outside_the_vocabulary_still_fails_with_a_hint():
    config = small_run_config()
    config["model"]["model_config"]["num_layer"] = 9
    with pytest.raises(ConfigError, match=r"num_layer \(did you mean num_layers\?\)"):
        build_model_config(config)
    config = small_run_config()
    config["moe_config"]["expert_numm"] = 4
    with pytest.raises(ConfigError, match=r"moe_config\.expert_numm \(did you mean"):
        build_model_config(config)


@pytest.mark.parametrize("types, factors, alpha", [
    (["expert", "device", "comm"], [0.001, 0.0, 0.0], 0.001),
    (["expert"], [0.0001], 0.0001),
    (["device", "expert"], [0.0, 0.02], 0.02),
    (["device"], [0.0], 0.0),
])
def test_aux_loss_types_pair_with_factors_by_position(types, factors, alpha):
    config = small_run_config()
    config["moe_config"].update(aux_loss_types=types, aux_loss_factors=factors)
    assert build_model_config(config).seq_balance_loss_alpha == alpha


@pytest.mark.parametrize("types, factors, message", [
    (["expert", "device", "comm"], [0.001, 0.01, 0.0], "'device' balance loss factor 0.01"),
    (["expert", "comm"], [0.001, 0.5], "'comm' balance loss factor 0.5"),
    (["expert", "router"], [0.001, 0.0], "aux_loss_types"),
    (["expert", "device"], [0.001], "one factor per entry"),
])
def test_unsupported_aux_losses_are_refused(types, factors, message):
    config = small_run_config()
    config["moe_config"].update(aux_loss_types=types, aux_loss_factors=factors)
    with pytest.raises(ConfigError, match=message):
        build_model_config(config)


def test_topk_bias_balance_callback_drives_the_rate():
    config = small_run_config()
    config["callbacks"] = [{"type": "MFLossMonitor"},
                           {"type": "TopkBiasBalanceCallback", "balance_via_topk_bias": True,
                            "topk_bias_update_rate": 0.005, "expert_num": 4, "micro_batch_num": 4}]
    assert build_model_config(config).topk_bias_update_rate == 0.005
    off = copy.deepcopy(config)
    off["callbacks"][1]["balance_via_topk_bias"] = False
    assert build_model_config(off).topk_bias_update_rate == 0.0
    conflicting = copy.deepcopy(config)
    conflicting["moe_config"]["topk_bias_update_rate"] = 0.001
    with pytest.raises(ConfigError, match=r"moe_config\.topk_bias_update_rate \(0\.001\) contradicts"):
        build_model_config(conflicting)
    wrong_experts = copy.deepcopy(config)
    wrong_experts["callbacks"][1]["expert_num"] = 8
    with pytest.raises(ConfigError, match=r"expert_num .*must equal the model's routed experts \(4\)"):
        build_model_config(wrong_experts)


def test_router_changing_moe_values_are_refused():
    for key, value in (("use_gating_sigmoid", False), ("z_loss_factor", 0.01)):
        config = small_run_config()
        config["moe_config"][key] = value
        with pytest.raises(ConfigError, match=f"moe_config.{key}"):
            build_model_config(config)
