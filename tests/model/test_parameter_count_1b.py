"""The shipped 1B YAML is MindFormers' guide model: its main-model parameter count equals transformers'
`DeepseekV3ForCausalLM` built on the meta device from the same values, read straight from the YAML."""
import pytest
import yaml

from mindpretrain import registry
from mindpretrain.config import load_config
from mindpretrain.model_builder import build_model_config
from research.deepseek3.parameter_count import count_parameters
from conftest import PROJECT_ROOT, require_reference

YAML_1B = PROJECT_ROOT / "research/deepseek3/deepseek3_671b/pretrain_deepseek3_1b.yaml"
GUIDE_1B = PROJECT_ROOT / "tests/data/mindformers/pretrain_deepseek3_1b_guide.yaml"


def hf_values_from_mindformers_yaml(path):
    """MindFormers' names -> transformers' config arguments, written out here by hand (not through our alias
    table), so the count below is checked against an independent reading of the YAML."""
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    model, moe = raw["model"]["model_config"], raw["moe_config"]
    return dict(vocab_size=model["vocab_size"], hidden_size=model["hidden_size"],
                intermediate_size=model["intermediate_size"], num_hidden_layers=model["num_layers"],
                num_attention_heads=model["num_heads"], num_key_value_heads=model["num_heads"],
                kv_lora_rank=model["kv_lora_rank"], q_lora_rank=model["q_lora_rank"],
                qk_rope_head_dim=model["qk_rope_head_dim"], v_head_dim=model["v_head_dim"],
                qk_nope_head_dim=model["qk_nope_head_dim"], n_routed_experts=moe["expert_num"],
                num_experts_per_tok=moe["num_experts_chosen"], n_shared_experts=moe["shared_expert_num"],
                moe_intermediate_size=moe["moe_intermediate_size"], first_k_dense_replace=moe["first_k_dense_replace"],
                n_group=moe["n_group"], topk_group=moe["topk_group"], norm_topk_prob=moe["norm_topk_prob"],
                routed_scaling_factor=moe["routed_scaling_factor"], tie_word_embeddings=False)


def transformers_main_model_count(values):
    """Parameters plus the routers' `e_score_correction_bias` buffers (a tensor of the checkpoint here too)."""
    torch = require_reference("torch")
    transformers = require_reference("transformers")
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**values))
    parameters = sum(tensor.numel() for tensor in model.parameters())
    biases = sum(tensor.numel() for name, tensor in model.named_buffers() if name.endswith("e_score_correction_bias"))
    return parameters + biases


@pytest.fixture(scope="module")
def model_config_1b():
    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    return build_model_config(load_config(str(YAML_1B)))


def test_shipped_1b_is_the_guides_model():
    """The shipped file carries the guide's values (hidden 2048, 3 layers, 8 heads, ...), i.e. it reads the same
    as the guide's edit kept as test data."""
    assert hf_values_from_mindformers_yaml(YAML_1B) == hf_values_from_mindformers_yaml(GUIDE_1B)
    values = hf_values_from_mindformers_yaml(YAML_1B)
    assert (values["hidden_size"], values["num_hidden_layers"], values["num_attention_heads"],
            values["intermediate_size"], values["n_routed_experts"], values["moe_intermediate_size"],
            values["first_k_dense_replace"], values["n_group"], values["topk_group"],
            values["norm_topk_prob"]) == (2048, 3, 8, 6144, 16, 2048, 1, 8, 4, False)


def test_1b_main_model_count_equals_transformers(model_config_1b):
    expected = transformers_main_model_count(hf_values_from_mindformers_yaml(YAML_1B))
    assert count_parameters(model_config_1b)["total_main"] == expected == 1_024_675_872


def test_1b_training_values_follow_the_guide(model_config_1b):
    """topk_bias_update_rate 1e-4 (from TopkBiasBalanceCallback), the 'expert' aux loss 0.001, n_kv_heads
    128 kept and reported as a no-op, MTP depth 1."""
    assert model_config_1b.topk_bias_update_rate == 1e-4
    assert model_config_1b.seq_balance_loss_alpha == 0.001
    assert model_config_1b.num_key_value_heads == model_config_1b.num_attention_heads == 8
    assert "model.model_config.n_kv_heads" in model_config_1b.no_effect_keys
    assert model_config_1b.num_nextn_predict_layers == 1
