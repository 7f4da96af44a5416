"""ParallelConfig: reading MindFormers' YAML keys, validation errors, and pipeline layer placement."""
import pytest

from mindpretrain.validation import ConfigError
from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.parallel.pipeline import bubble_fraction, layers_per_stage, place_layers, suggest_offset
from research.deepseek3.deepseek3_config import DeepseekV3Config

FULL = DeepseekV3Config()          # the 671B release sizes
SMALL = DeepseekV3Config(vocab_size=1000, hidden_size=64, num_hidden_layers=6, num_attention_heads=8,
                         intermediate_size=192, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=2,
                         topk_group=1, num_nextn_predict_layers=1, seq_length=128)


def layout(**values):
    return ParallelConfig.from_dict(values)


def test_reads_mindformers_keys_and_optimizer_sharding_from_parallel_section():
    run = {"parallel_config": {"data_parallel": 16, "model_parallel": 4, "pipeline_stage": 16, "expert_parallel": 8,
                               "micro_batch_num": 32, "vocab_emb_dp": True, "use_seq_parallel": True,
                               "gradient_aggregation_group": 4, "context_parallel": 1},
           "parallel": {"enable_parallel_optimizer": True},
           "model": {"model_config": {"offset": [1] * 15 + [-1], "moe_config": {"expert_model_parallel": 1}}}}
    pc = ParallelConfig.from_run_config(run)
    assert (pc.data_parallel, pc.model_parallel, pc.pipeline_stage, pc.expert_parallel) == (16, 4, 16, 8)
    assert pc.device_num == 1024 and pc.devices_per_stage == 64
    assert pc.optimizer_shard and pc.use_seq_parallel and pc.vocab_emb_dp
    assert pc.offset == tuple([1] * 15 + [-1])
    assert pc.expert_tensor_parallel == 1 and pc.sequence_parallel == 4 and pc.vocab_parallel == 1
    placement = pc.validate(FULL, 1024)
    assert placement.layers_per_stage == tuple([4] * 15 + [2])


def test_legacy_optimizer_shard_alias_and_contradiction():
    assert ParallelConfig.from_dict({"optimizer_shard": True}).optimizer_shard
    with pytest.raises(ConfigError, match="contradicts parallel.enable_parallel_optimizer"):
        ParallelConfig.from_dict({"optimizer_shard": True}, enable_parallel_optimizer=False)


@pytest.mark.parametrize("values, device_num, message", [
    ({"model_parallel": 3, "data_parallel": 1}, 3,
     r"num_attention_heads \(128\) must be divisible by parallel_config.model_parallel \(3\)"),
    ({"expert_parallel": 3, "data_parallel": 3}, 3,
     r"n_routed_experts \(256\) must be divisible by parallel_config.expert_parallel \(3\)"),
    ({"expert_parallel": 8, "data_parallel": 4, "model_parallel": 2}, 8,
     r"parallel_config.expert_parallel \(8\) must divide parallel_config.data_parallel \(4\)"),
    ({"data_parallel": 4, "model_parallel": 2}, 16,
     r"data_parallel 4 \* model_parallel 2 \* pipeline_stage 1 = 8.*must equal the device count \(16\)"),
    ({"pipeline_stage": 4, "micro_batch_num": 2}, 4,
     r"parallel_config.micro_batch_num \(2\) must be >= parallel_config.pipeline_stage \(4\)"),
    ({"data_parallel": 0}, 0, r"parallel_config.data_parallel \(0\) must be a positive integer"),
])
def test_bad_layouts_name_key_value_and_rule(values, device_num, message):
    with pytest.raises(ConfigError, match=message):
        layout(**values).validate(FULL, device_num)


def test_vocab_rule_only_without_vocab_emb_dp():
    cfg = DeepseekV3Config(vocab_size=129281, num_attention_heads=128)
    with pytest.raises(ConfigError, match=r"vocab_size \(129281\) must be divisible by parallel_config.model_parallel "
                                          r"\(4\) unless parallel_config.vocab_emb_dp is True"):
        layout(model_parallel=4, vocab_emb_dp=False).validate(cfg, 4)
    layout(model_parallel=4, vocab_emb_dp=True).validate(cfg, 4)


def test_sizes_split_by_model_parallel_are_checked():
    cfg = DeepseekV3Config(intermediate_size=18433)
    with pytest.raises(ConfigError, match=r"intermediate_size \(18433\) must be divisible by "
                                          r"parallel_config.model_parallel \(2\)"):
        layout(model_parallel=2).validate(cfg, 2)
    cfg = DeepseekV3Config(moe_intermediate_size=2047)
    with pytest.raises(ConfigError, match=r"moe_intermediate_size \(2047\) must be divisible by the expert "
                                          r"tensor-parallel degree \(2\)"):
        layout(model_parallel=2).validate(cfg, 2)
    cfg = DeepseekV3Config(seq_length=4098)
    with pytest.raises(ConfigError, match=r"seq_length \(4098\) must be divisible by parallel_config.model_parallel "
                                          r"\(4\) when parallel_config.use_seq_parallel is True"):
        layout(model_parallel=4, use_seq_parallel=True).validate(cfg, 4)


def test_unknown_and_unsupported_keys():
    with pytest.raises(ConfigError, match=r"parallel_config.data_paralel \(2\) is not a known parallel_config key "
                                          r"\(did you mean data_parallel"):
        ParallelConfig.from_dict({"data_paralel": 2})
    with pytest.raises(ConfigError, match=r"parallel_config.context_parallel \(2\) is not supported"):
        ParallelConfig.from_dict({"context_parallel": 2})


# ------------------------------------------------------------------------------------------ placement
def test_mindformers_offset_rule_for_the_671b_layout():
    counts, explicit = layers_per_stage(62, 16, [1] * 15 + [-1])
    assert counts == [4] * 15 + [2] and explicit
    placement = place_layers(FULL, layout(pipeline_stage=16, micro_batch_num=32, offset=[1] * 15 + [-1]))
    last = placement.stages[-1]
    assert last.decoder_layers == (60,) and last.mtp_layers == (0,) and last.has_head and last.has_embedding
    assert placement.stages[0].layer_ids == (0, 1, 2, 3) and placement.stages[0].has_embedding
    assert not placement.stages[1].has_embedding and not placement.stages[1].has_head
    assert [placement.stage_of_layer(i) for i in (0, 3, 4, 59, 60, 61)] == [0, 0, 1, 14, 15, 15]
    assert sum(placement.layers_per_stage) == 62


def test_default_split_gives_the_last_stage_the_remainder():
    placement = place_layers(FULL, layout(pipeline_stage=16, micro_batch_num=16))
    assert placement.layers_per_stage == tuple([3] * 15 + [17]) and not placement.balanced
    assert placement.suggested_offset() == [1] * 15 + [-1]
    # 48 layers over 5 stages: the remainder 3 goes to the first stages and the head's stage gives one up
    assert suggest_offset(48, 5) == [1, 1, 1, 1, -1]
    assert layers_per_stage(48, 5, suggest_offset(48, 5))[0] == [10, 10, 10, 10, 8]


def test_integer_offset_applies_to_every_stage():
    counts, _ = layers_per_stage(7 + 1, 4, 0)            # divides: 2 each
    assert counts == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match=r"offset \(1\) as an integer is added to every one of the 4 stages"):
        layers_per_stage(62, 4, 1)


@pytest.mark.parametrize("offset, message", [
    ([1, 1, 0], r"must have one entry per pipeline stage \(pipeline_stage = 4\)"),
    ([1, 1, 0, 0], r"must sum to the remainder of 7 layers .* \(7 % 4 = 3\); it sums to 2"),
    ([3, 1, 0, -1], r"leaves pipeline stage 3 with 0 layers; every stage needs at least one"),
])
def test_bad_offsets(offset, message):
    with pytest.raises(ConfigError, match=message):
        place_layers(SMALL, layout(pipeline_stage=4, micro_batch_num=4, offset=offset))


def test_mtp_must_stay_on_the_last_stage_and_stages_need_layers():
    with pytest.raises(ConfigError, match=r"MTP block\(s\) must sit on the last stage"):
        place_layers(DeepseekV3Config(num_hidden_layers=5, num_nextn_predict_layers=2),
                     layout(pipeline_stage=2, micro_batch_num=2, offset=[3, -2]))
    with pytest.raises(ConfigError, match=r"parallel_config.pipeline_stage \(8\) must not exceed the number of layers"):
        place_layers(SMALL, layout(pipeline_stage=8, micro_batch_num=8))


def test_bubble_fraction():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(16, 32) == pytest.approx(15 / 47)
    assert place_layers(SMALL, layout(pipeline_stage=2, micro_batch_num=6)).bubble_fraction == pytest.approx(1 / 7)


def test_pipeline_stages_assigned_to_the_model_cells():
    from mindpretrain.parallel.pipeline import assign_pipeline_stages
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{**SMALL.to_dict(), "num_hidden_layers": 3, "vocab_size": 256, "recompute": False})
    placement = place_layers(cfg, layout(pipeline_stage=2, micro_batch_num=2, offset=[1, -1]))   # 3 + 1 MTP -> 3, 1
    assert placement.layers_per_stage == (3, 1)
    model = DeepseekV3ForCausalLM(cfg)
    stages = assign_pipeline_stages(model, placement)
    assert stages == {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 0,
                      "model.layers.3": 1, "model.layers.3.embed_tokens": 1, "model.norm": 1, "lm_head": 1}
    assert model.model.layers[3].pipeline_stage == 1 and model.model.layers[0].pipeline_stage == 0
    assert model.lm_head.pipeline_stage == 1
    # the MTP block reads the embedding through its own cell on the last stage, holding the stage-0 Parameter
    assert model.model.layers[3].embed_tokens.pipeline_stage == 1 and model.model.embed_tokens.pipeline_stage == 0
    assert model.model.layers[3].embed_tokens.weight is model.model.embed_tokens.weight


def test_optimizer_weight_shard_size_from_either_mindformers_place():
    run_config = {"parallel_config": {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2},
                  "parallel": {"enable_parallel_optimizer": True,
                               "parallel_optimizer_config": {"optimizer_weight_shard_size": 8}}}
    config = ParallelConfig.from_run_config(run_config)
    assert config.optimizer_weight_shard_size == 8
    assert config.parallel_optimizer_context == {"optimizer_weight_shard_size": 8}
    assert ParallelConfig.from_dict({"optimizer_weight_shard_size": 4}).optimizer_weight_shard_size == 4
    assert ParallelConfig.from_dict({}).parallel_optimizer_context == {}    # -1: the whole group, nothing to set
    unsharded = ParallelConfig.from_dict({"optimizer_weight_shard_size": 4}, enable_parallel_optimizer=False)
    assert unsharded.parallel_optimizer_context == {}
    with pytest.raises(ConfigError, match="set it in one place"):
        ParallelConfig.from_dict({"optimizer_weight_shard_size": 4}, optimizer_weight_shard_size=8)
    with pytest.raises(ConfigError, match="optimizer_weight_shard_size"):
        ParallelConfig.from_dict({"optimizer_weight_shard_size": 0})
    with pytest.raises(ConfigError, match="did you mean optimizer_weight_shard_size"):
        ParallelConfig.from_dict({"optimizer_weight_shard_sise": 8})
