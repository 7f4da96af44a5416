"""DeepSeek-V3 model plugin: parameter counts, config validation and aliases, gradients, expert-bias updates,
bad HF checkpoints, the logits CLI, GRAPH-mode training step, plugin registration."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain import registry
from mindpretrain.checkpoint.safetensors_io import read_checkpoint_dir, save_safetensors, load_safetensors
from mindpretrain.config import load_config
from mindpretrain.model_builder import build_model_config
from mindpretrain.validation import ConfigError
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
from research.deepseek3.hf_weights import CheckpointMismatchError, load_hf_weights
from research.deepseek3.moe import expert_bias_update
from research.deepseek3.parameter_count import count_parameters
from research.deepseek3.weight_mapping import hf_parameter_shapes, non_trainable_names, release_duplicates
from conftest import PROJECT_ROOT, require_reference

CONFIG_671B = PROJECT_ROOT / "research/deepseek3/deepseek3_671b/pretrain_deepseek3_671b.yaml"
CONFIG_1B = PROJECT_ROOT / "research/deepseek3/deepseek3_671b/pretrain_deepseek3_1b.yaml"
CONFIG_TINY = PROJECT_ROOT / "configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml"

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, seq_length=16, compute_dtype="float32", initializer_range=0.2, num_nextn_predict_layers=1)


@pytest.fixture(scope="module", autouse=True)
def pynative_cpu():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")


def yaml_model_config(path):
    values = load_config(str(path)).to_dict()["model"]["model_config"]
    values.pop("type")
    return values


def tiny_batch(model_config, seed=0, batch=2):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, model_config.vocab_size, (batch, model_config.seq_length)).astype(np.int32)
    labels = rng.randint(0, model_config.vocab_size, (batch, model_config.seq_length)).astype(np.int32)
    mask = np.ones((batch, model_config.seq_length), np.float32)
    return Tensor(ids), Tensor(labels), Tensor(mask)


# ---------------------------------------------------------------------------------------------------------------
# parameter counts and the name table
# ---------------------------------------------------------------------------------------------------------------

def test_671b_parameter_counts():
    model_config = DeepseekV3Config(**yaml_model_config(CONFIG_671B))
    counts = count_parameters(model_config)
    assert counts["total_main"] == 671_026_419_200
    main_shapes = hf_parameter_shapes(model_config, include_mtp=False)
    assert counts["total_main"] == sum(int(np.prod(s)) for n, s in main_shapes.items())
    assert counts["trainable_main"] == 671_026_419_200 - 58 * 256          # the expert-score biases
    assert counts["mtp"] == 11_610_068_224
    assert counts["release_total"] == counts["total_with_mtp"] + 2 * 129280 * 7168   # + MTP embedding/head copies
    # activated: all but the 248 unchosen routed experts of each of the 58 MoE layers
    assert counts["activated_main"] == 671_026_419_200 - 58 * 248 * 3 * 7168 * 2048 == 37_552_297_472
    assert 36.5e9 < counts["activated_main_excluding_embedding"] < 37.0e9
    assert counts["by_group"]["routed_expert"] == 58 * 256 * 3 * 7168 * 2048


def test_671b_release_names():
    model_config = DeepseekV3Config()
    shapes = hf_parameter_shapes(model_config)
    assert shapes["model.layers.0.self_attn.q_a_proj.weight"] == (1536, 7168)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (128 * 192, 1536)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (128 * 256, 512)
    assert shapes["model.layers.2.mlp.gate_proj.weight"] == (18432, 7168)
    assert shapes["model.layers.3.mlp.experts.255.down_proj.weight"] == (7168, 2048)
    assert shapes["model.layers.60.mlp.gate.e_score_correction_bias"] == (256,)
    assert shapes["model.layers.61.eh_proj.weight"] == (7168, 14336)
    assert shapes["model.layers.61.shared_head.norm.weight"] == (7168,)
    assert shapes["model.layers.61.mlp.experts.0.gate_proj.weight"] == (2048, 7168)
    assert "model.layers.3.mlp.gate_proj.weight" not in shapes
    assert dict(release_duplicates(model_config)) == {
        "model.layers.61.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.61.shared_head.head.weight": "lm_head.weight"}
    assert len(non_trainable_names(model_config)) == 59                       # 58 main MoE layers + the MTP block


def test_1b_and_tiny_yaml_configs():
    # MindFormers' layout: moe_config and the bias callback sit outside model.model_config (build_model_config)
    model_config_1b = build_model_config(load_config(str(CONFIG_1B)))
    assert (model_config_1b.hidden_size, model_config_1b.num_hidden_layers, model_config_1b.n_routed_experts,
            model_config_1b.first_k_dense_replace) == (2048, 3, 16, 1)
    counts = count_parameters(model_config_1b)
    assert 0.8e9 < counts["total_main"] < 1.2e9
    with pytest.raises(ConfigError, match="compute_dtype .* cannot run with device_target CPU"):
        model_config_1b.check_device("CPU")
    model_config_1b.check_device("Ascend")
    tiny = DeepseekV3Config(**yaml_model_config(CONFIG_TINY))
    tiny.check_device("CPU")
    assert tiny.num_moe_layers == tiny.num_hidden_layers - tiny.first_k_dense_replace + 1


# ---------------------------------------------------------------------------------------------------------------
# config: aliases, validation, HF round trip
# ---------------------------------------------------------------------------------------------------------------

def test_mindformers_aliases_give_the_same_config():
    mindformers_style = dict(
        num_layers=61, num_heads=128, n_kv_heads=128, hidden_size=7168, intermediate_size=18432, theta=10000.0,
        mtp_depth=1, mtp_loss_factor=0.3, init_method_std=0.006, seq_length=4096, batch_size=1, use_flash_attention=True,
        extend_method="YARN", scaling_factor={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 40.0, "mscale": 1.0,
                                              "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
        moe_config=dict(expert_num=256, num_experts_chosen=8, shared_expert_num=1, routed_scaling_factor=2.5,
                        first_k_dense_replace=3, moe_intermediate_size=2048, n_group=8, topk_group=4,
                        topk_bias_update_rate=0.001, norm_topk_prob=True, aux_loss_factors=[0.0001],
                        aux_loss_factor=0.05, routing_policy="TopkRouterV2", use_gmm=True))
    canonical = dict(num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, hidden_size=7168,
                     intermediate_size=18432, rope_theta=10000.0, num_nextn_predict_layers=1, mtp_loss_factor=0.3,
                     initializer_range=0.006, seq_length=4096,
                     rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                     n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.5,
                     first_k_dense_replace=3, moe_intermediate_size=2048, n_group=8, topk_group=4,
                     topk_bias_update_rate=0.001, norm_topk_prob=True, seq_balance_loss_alpha=0.0001,
                     use_flash_attention=True, use_gmm=True)
    assert DeepseekV3Config(**mindformers_style) == DeepseekV3Config(**canonical)


def test_config_fields_are_dataclass_fields_with_one_docstring_each():
    """Fields, defaults (the 671B release) and the alias table come from one place: the dataclass."""
    import ast
    import dataclasses
    import inspect

    from research.deepseek3 import deepseek3_config

    fields = {field.name: field.default for field in dataclasses.fields(DeepseekV3Config)}
    assert (fields["hidden_size"], fields["num_hidden_layers"], fields["n_routed_experts"]) == (7168, 61, 256)
    assert list(DeepseekV3Config().to_dict()) == list(fields)
    assert all(canonical in fields for _, canonical in DeepseekV3Config.mindformers_aliases())
    assert set(deepseek3_config.HF_FIELDS) < set(fields) and "seq_length" not in deepseek3_config.HF_FIELDS
    body = next(node for node in ast.parse(inspect.getsource(deepseek3_config)).body
                if isinstance(node, ast.ClassDef) and node.name == "DeepseekV3Config").body
    documented = [statement.target.id for statement, following in zip(body, body[1:] + [None])
                  if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr)
                  and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)]
    assert documented == list(fields)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_routed_experts=6, n_group=4), r"n_routed_experts \(6\) must be divisible by n_group \(4\)"),
    (dict(topk_group=3, n_group=2), r"topk_group \(3\) must not exceed n_group \(2\)"),
    (dict(num_experts_per_tok=5, n_routed_experts=4, n_group=1, topk_group=1),
     r"num_experts_per_tok \(5\) must not exceed n_routed_experts \(4\)"),
    (dict(n_routed_experts=8, num_experts_per_tok=5, n_group=2, topk_group=1), r"num_experts_per_tok \(5\) must not exceed the experts of"),
    (dict(hidden_size=0), r"hidden_size \(0\) must be a positive integer"),
    (dict(q_lora_rank=-3), r"q_lora_rank \(-3\) must be a positive integer or null"),
    (dict(qk_rope_head_dim=7), r"qk_rope_head_dim \(7\) must be even"),
    (dict(first_k_dense_replace=5), r"first_k_dense_replace \(5\) must not exceed num_hidden_layers \(2\)"),
    (dict(compute_dtype="float8"), r"compute_dtype \('float8'\) must be one of float32, float16, bfloat16"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"rope_scaling.type \('linear'\) must be 'yarn'"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "alpha": 1}),
     r"rope_scaling \(\['alpha'\]\) has unknown keys"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope_scaling.original_max_position_embeddings .* required"),
    (dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}),
     r"rope_scaling.factor \(0.5\) must be a number >= 1"),
    (dict(num_key_value_heads=1), r"num_key_value_heads \(1\) must equal num_attention_heads \(2\)"),
    (dict(recompute=["full"]), r"recompute .* one entry per layer \(3, main \+ MTP\)"),
    (dict(recompute="sometimes"), r"recompute \('sometimes'\) must be a bool or one of none, full, selective"),
    (dict(num_layers=3), r"num_layers \(3\) contradicts num_hidden_layers \(2\)"),
    (dict(hiden_size=3), r"unknown DeepseekV3Config keys: hiden_size \(did you mean hidden_size\?\)"),
    (dict(moe_config={"expert_nums": 4}), r"moe_config.expert_nums \(did you mean moe_config.expert_num\?\)"),
])
def test_config_validation_errors(overrides, message):
    values = dict(TINY)
    values.update(overrides)
    with pytest.raises(ConfigError, match=message):
        DeepseekV3Config(**values)


def test_bfloat16_refused_on_cpu():
    model_config = DeepseekV3Config(**dict(TINY, compute_dtype="bfloat16"))
    with pytest.raises(ConfigError, match=r"model_config.compute_dtype \('bfloat16'\) cannot run with device_target "
                                          r"CPU: MindSpore's CPU kernels"):
        model_config.check_device("CPU")
    assert model_config.check_device("Ascend") is model_config


def test_hf_config_round_trip(tmp_path):
    model_config = DeepseekV3Config(**dict(TINY, rope_scaling={"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 16}))
    data = model_config.to_hf_dict()
    assert data["model_type"] == "deepseek_v3" and data["num_key_value_heads"] == 2
    (tmp_path / "config.json").write_text(json.dumps(data))
    back = DeepseekV3Config.from_hf(str(tmp_path), compute_dtype="float32", seq_length=16)
    assert back == model_config
    data["scoring_func"] = "softmax"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"scoring_func \('softmax'\) must be 'sigmoid'"):
        DeepseekV3Config.from_hf(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# model behaviour
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    model_config = DeepseekV3Config(**TINY)
    return DeepseekV3ForCausalLM(model_config)


def test_names_match_the_table(tiny_model):
    names = {name: tuple(param.shape) for name, param in tiny_model.parameters_and_names()}
    assert names == dict(hf_parameter_shapes(tiny_model.model_config))
    trainable = {param.name for param in tiny_model.trainable_params()}
    assert not trainable & set(non_trainable_names(tiny_model.model_config))


def test_tied_embeddings_share_the_head():
    model_config = DeepseekV3Config(**dict(TINY, tie_word_embeddings=True, num_nextn_predict_layers=0))
    model = DeepseekV3ForCausalLM(model_config)
    names = [name for name, _ in model.parameters_and_names()]
    assert "lm_head.weight" not in names and names == list(hf_parameter_shapes(model_config))
    assert model.lm_head.weight is model.model.embed_tokens.weight      # the head cell holds the shared Parameter
    ids = tiny_batch(model_config)[0]
    hidden = model.model(ids)[0].asnumpy()
    expected = hidden @ model.model.embed_tokens.weight.asnumpy().T
    np.testing.assert_allclose(model(ids).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    loss, _, mtp_loss, _, load = model(*tiny_batch(model_config))
    assert float(mtp_loss.asnumpy()) == 0.0 and load.shape == (1, model_config.n_routed_experts)


def test_gradients_reach_every_trained_parameter(tiny_model):
    model_config = tiny_model.model_config
    ids, labels, mask = tiny_batch(model_config, seed=1, batch=4)
    weights = tiny_model.trainable_params()
    biases_before = [bias.asnumpy().copy() for bias in tiny_model.moe_layer_biases()]

    def loss_fn(ids, labels, mask):
        return tiny_model(ids, labels, mask)[0]

    grads = ms.value_and_grad(loss_fn, None, weights)(ids, labels, mask)[1]
    dead = [param.name for param, grad in zip(weights, grads)
            if grad is None or not np.isfinite(grad.asnumpy()).all() or float(np.abs(grad.asnumpy()).sum()) == 0.0]
    assert not dead, f"parameters without gradient: {dead}"
    assert len(weights) == len(hf_parameter_shapes(model_config)) - len(non_trainable_names(model_config))
    assert all(not bias.requires_grad for bias in tiny_model.moe_layer_biases())
    for before, bias in zip(biases_before, tiny_model.moe_layer_biases()):
        np.testing.assert_array_equal(before, bias.asnumpy())


def test_training_outputs_and_loss_mask(tiny_model):
    model_config = tiny_model.model_config
    ids, labels, mask = tiny_batch(model_config, seed=2)
    loss, lm_loss, mtp_loss, balance, load = tiny_model(ids, labels, mask)
    assert load.shape == (model_config.num_moe_layers, model_config.n_routed_experts) and load.dtype == ms.float32
    np.testing.assert_allclose(float(loss.asnumpy()), float(lm_loss.asnumpy()) + model_config.mtp_loss_factor *
                               float(mtp_loss.asnumpy()) + float(balance.asnumpy()), rtol=1e-6)
    assert float(balance.asnumpy()) > 0                     # seq_balance_loss_alpha defaults to 1e-4
    # masked positions do not count: garbage labels (even negative) under a zero mask leave the LM loss unchanged
    logits = tiny_model(ids).asnumpy().astype(np.float64)
    mask_np = np.ones(labels.shape, np.float32)
    mask_np[:, ::3] = 0
    bad_labels = labels.asnumpy().copy()
    bad_labels[:, ::3] = -100
    lm_masked = float(tiny_model(ids, Tensor(bad_labels), Tensor(mask_np))[1].asnumpy())
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, np.clip(bad_labels, 0, None)[..., None], -1)[..., 0]
    expected = float(-(picked * mask_np).sum() / mask_np.sum())
    assert abs(lm_masked - expected) < 1e-5


def test_mtp_reads_the_main_embedding_through_its_own_cell(tiny_model):
    """Pipeline placement needs the MTP block's embedding as a cell of the block: it must hold the main
    Parameter (no new parameter or name), at the path of the release's duplicate tensor."""
    model_config = tiny_model.model_config
    main = tiny_model.model.embed_tokens.weight
    block = tiny_model.model.layers[model_config.num_hidden_layers]
    assert block.embed_tokens.weight is main
    named = list(tiny_model.parameters_and_names())
    assert sorted(name for name, _ in named) == sorted(hf_parameter_shapes(model_config))  # same names and count
    assert all(param.name == name for name, param in named)                      # checkpoint names too
    assert len(tiny_model.trainable_params()) + model_config.num_moe_layers == len(named)   # + the no-grad biases
    cell_paths = {path for path, _ in tiny_model.cells_and_names()}
    duplicate = f"model.layers.{model_config.num_hidden_layers}.embed_tokens"
    assert duplicate in cell_paths
    assert release_duplicates(model_config)[duplicate + ".weight"] == "model.embed_tokens.weight"
    # the block's embedding of its (shifted) tokens is the main embedding of them
    ids = tiny_batch(model_config, seed=5)[0]
    np.testing.assert_array_equal(block.embed_tokens(ids).asnumpy(), tiny_model.model.embed_tokens(ids).asnumpy())


def test_fused_chunked_head_loss_matches_autodiff_of_the_plain_loss(tiny_model):
    """The LM/MTP cross-entropy computes its own gradient, chunk by chunk (head.py): loss and gradients must equal
    plain autodiff through materialised logits, whatever the chunking, up to float summation order."""
    from research.deepseek3.deepseek3_model import masked_cross_entropy
    from research.deepseek3.head import loss_chunk_size

    assert loss_chunk_size(2048, 32000, 8 * 1024 * 1024) == 256 and loss_chunk_size(32, 96, 10 ** 9) == 32
    assert loss_chunk_size(4096, 129280, 8 * 1024 * 1024) == 256          # capped at 16 chunks
    assert loss_chunk_size(30, 96, 4 * 96) == 4                           # 8 chunks, the last one of 2 rows
    assert loss_chunk_size(2048, 32000, None) == 2048                     # default: one chunk
    # the 1B head (129280 x 2048): 256 tokens stay one chunk, a second 1 GiB partial gradient would cost more
    assert loss_chunk_size(256, 129280, 16 * 1024 * 1024, weight_elements=129280 * 2048) == 256
    assert loss_chunk_size(2048, 32000, 8 * 1024 * 1024, weight_elements=32000 * 256) == 256   # narrow: unchanged
    model_config = tiny_model.model_config
    ids, labels, _ = tiny_batch(model_config, seed=6)
    mask = Tensor((np.random.RandomState(6).rand(2, model_config.seq_length) > 0.3).astype(np.float32))
    weights = tiny_model.trainable_params()

    def plain_lm_loss(ids, labels, mask):
        return masked_cross_entropy(tiny_model.head(tiny_model.model(ids)[0]), labels, mask)

    def fused_lm_loss(ids, labels, mask):
        return tiny_model(ids, labels, mask)[1]

    def value_and_grads(function):
        value, grads = ms.value_and_grad(function, None, weights)(ids, labels, mask)
        return float(value.asnumpy()), [grad.asnumpy() for grad in grads]

    reference, reference_grads = value_and_grads(plain_lm_loss)
    cross_entropy = tiny_model.lm_head.cross_entropy
    default = cross_entropy.chunk_elements
    for chunk_elements in (default, 5 * model_config.vocab_size):      # one chunk; 7 chunks (six of 5 rows, one of 2)
        cross_entropy.chunk_elements = chunk_elements
        cross_entropy.floor_at_weight_gradient = False          # the tiny head is narrower than 5 rows of logits
        try:
            value, grads = value_and_grads(fused_lm_loss)
        finally:
            cross_entropy.chunk_elements = default
            cross_entropy.floor_at_weight_gradient = True
        assert value == pytest.approx(reference, rel=1e-6)
        for param, expected, actual in zip(weights, reference_grads, grads):
            # atol: chunked partial sums reorder float32 additions; gradients here are ~0.1, and one in 512
            # elements was seen 1.3e-7 off under a loaded machine (different thread split of the reductions).
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=param.name)


def test_one_head_pass_for_several_losses_equals_separate_passes(tiny_model):
    """masked_cross_entropies (main + MTP in one pass, one [vocab, H] weight gradient) = one pass per loss."""
    head = tiny_model.lm_head
    model_config = tiny_model.model_config
    rng = np.random.RandomState(9)
    shape = (2, model_config.seq_length)
    hidden = [Tensor(rng.randn(*shape, model_config.hidden_size).astype(np.float32)) for _ in range(2)]
    labels = [Tensor(rng.randint(0, model_config.vocab_size, shape).astype(np.int32)) for _ in range(2)]
    masks = [Tensor((rng.rand(*shape) > 0.3).astype(np.float32)) for _ in range(2)]
    weight = [head.weight]
    assert not head.merge_passes                                  # 96 x 32: too narrow to be worth one pass
    head.merge_passes = True
    try:
        for reduction in ("mean", "sum"):
            def together(h0, h1):
                segments = ((h0, labels[0], masks[0]), (h1, labels[1], masks[1]))
                losses = head.masked_cross_entropies(segments, reduction)
                return losses[0] + 0.3 * losses[1], losses

            def apart(h0, h1):
                losses = (head.masked_cross_entropy(h0, labels[0], masks[0], reduction),
                          head.masked_cross_entropy(h1, labels[1], masks[1], reduction))
                return losses[0] + 0.3 * losses[1], losses

            (_, merged), merged_grads = ms.value_and_grad(together, (0, 1), weight, has_aux=True)(*hidden)
            (_, separate), separate_grads = ms.value_and_grad(apart, (0, 1), weight, has_aux=True)(*hidden)
            for ours, expected in zip(merged, separate):
                assert float(ours.asnumpy()) == pytest.approx(float(expected.asnumpy()), rel=1e-6)
            for ours, expected in zip(merged_grads[0] + merged_grads[1], separate_grads[0] + separate_grads[1]):
                np.testing.assert_allclose(ours.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-7)
    finally:
        head.merge_passes = False


def test_one_embedding_lookup_for_main_and_mtp_equals_separate_lookups(tiny_model):
    """The stacked lookup (one embedding gradient instead of 1 + D summed) trains exactly like separate ones,
    which pipeline runs keep (`merge_embedding_lookups` off)."""
    ids, labels, mask = tiny_batch(tiny_model.model_config, seed=8)
    weights = tiny_model.trainable_params()

    def outputs():
        (loss, lm_loss, mtp_loss, _, _), grads = ms.value_and_grad(
            lambda *batch: tiny_model(*batch), None, weights, has_aux=True)(ids, labels, mask)
        return [float(value.asnumpy()) for value in (loss, lm_loss, mtp_loss)], [grad.asnumpy() for grad in grads]

    assert tiny_model.merge_embedding_lookups
    merged, merged_grads = outputs()
    tiny_model.merge_embedding_lookups = False
    try:
        separate, separate_grads = outputs()
    finally:
        tiny_model.merge_embedding_lookups = True
    assert merged == pytest.approx(separate, rel=1e-6) and merged[2] > 0
    for param, ours, expected in zip(weights, merged_grads, separate_grads):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7, err_msg=param.name)


def test_explicit_broadcasts_compute_the_same_losses_and_gradients(tiny_model):
    """Cells built in GRAPH mode on CPU expand their broadcast operands first (layers.broadcasts_explicitly):
    norms (float32 ones with their hand-written backward), RoPE, the attention mask and its backward, the MoE
    combine. Same numbers either way."""
    from research.deepseek3.layers import ExpandedRMSNormCore, RMSNorm, broadcasts_explicitly

    assert broadcasts_explicitly("CPU", ms.GRAPH_MODE) and not broadcasts_explicitly("CPU", ms.PYNATIVE_MODE)
    assert not broadcasts_explicitly("Ascend", ms.GRAPH_MODE)
    cells = [cell for _, cell in tiny_model.cells_and_names() if hasattr(cell, "explicit_broadcast")]
    kinds = {type(cell).__name__ for cell in cells}
    assert {"RMSNorm", "MultiHeadLatentAttention", "RecomputingAttentionCore", "DeepseekV3MoE"} <= kinds
    ids, labels, mask = tiny_batch(tiny_model.model_config, seed=10)
    weights = tiny_model.trainable_params()

    def outputs(explicit):
        for cell in cells:
            cell.explicit_broadcast = explicit
            if isinstance(cell, RMSNorm):                  # float32 norms then take the hand-written backward
                cell.float32_core = ExpandedRMSNormCore(cell.eps) if explicit else None
        (loss, lm_loss, mtp_loss, _, _), grads = ms.value_and_grad(
            lambda *batch: tiny_model(*batch), None, weights, has_aux=True)(ids, labels, mask)
        return [float(value.asnumpy()) for value in (loss, lm_loss, mtp_loss)], [grad.asnumpy() for grad in grads]

    try:
        expanded, expanded_grads = outputs(True)
    finally:
        implicit, implicit_grads = outputs(False)
    assert expanded == pytest.approx(implicit, rel=1e-6)
    for param, ours, expected in zip(weights, expanded_grads, implicit_grads):
        # the norms' sums are MatMuls there, ReduceSum/ReduceMean here: float32 summation order
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6, err_msg=param.name)


def test_update_expert_bias(tiny_model):
    model_config = tiny_model.model_config
    biases = tiny_model.moe_layer_biases()
    assert len(biases) == model_config.num_moe_layers == 2
    assert [b.name for b in biases] == ["model.layers.1.mlp.gate.e_score_correction_bias",
                                        "model.layers.2.mlp.gate.e_score_correction_bias"]
    before = [b.asnumpy().copy() for b in biases]
    load = np.array([[10, 0, 5, 1], [3, 3, 3, 3]], np.float32)
    tiny_model.update_expert_bias(load)
    for index, bias in enumerate(biases):
        np.testing.assert_allclose(bias.asnumpy(), expert_bias_update(before[index], load[index],
                                                                      model_config.topk_bias_update_rate))
    np.testing.assert_allclose(biases[0].asnumpy() - before[0], [-0.001, 0.001, -0.001, 0.001], atol=1e-7)
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        tiny_model.update_expert_bias(np.zeros((3, 4)))
    for bias, value in zip(biases, before):
        bias.set_data(Tensor(value))


def test_recompute_modes_build_and_match():
    model_config = DeepseekV3Config(**dict(TINY, recompute=["full", "selective", "none"]))
    model = DeepseekV3ForCausalLM(model_config)
    plain = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))
    ms.load_param_into_net(model, {name: ms.Parameter(param.asnumpy(), name=name)
                                   for name, param in plain.parameters_and_names()})
    ids, labels, mask = tiny_batch(model_config, seed=3)
    np.testing.assert_allclose(model(ids, labels, mask)[0].asnumpy(), plain(ids, labels, mask)[0].asnumpy(),
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# HF checkpoints: bad input, logits CLI
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    require_reference("torch")
    require_reference("transformers")
    from hf_reference import build_tiny_hf_deepseek_v3

    return build_tiny_hf_deepseek_v3(tmp_path_factory.mktemp("hf_model"), num_hidden_layers=2)


def _single_file_copy(src_dir, dst_dir, edit):
    """Rewrite an HF dir as one model.safetensors after `edit(tensors)`; config.json copied."""
    tensors = {}
    for name, path in read_checkpoint_dir(src_dir).items():
        tensors[name] = load_safetensors(path)[name]
    edit(tensors)
    os.makedirs(dst_dir, exist_ok=True)
    save_safetensors(os.path.join(dst_dir, "model.safetensors"), tensors)
    with open(os.path.join(src_dir, "config.json")) as source, open(os.path.join(dst_dir, "config.json"), "w") as out:
        out.write(source.read())
    return dst_dir


def test_bad_checkpoint_lists_every_problem_and_loads_nothing(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint

    def break_it(tensors):
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
        del tensors["model.norm.weight"]
        tensors["model.layers.1.mlp.experts.99.up_proj.weight"] = np.zeros((32, 64), np.float32)
        tensors["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((7, 32), np.float32)
        tensors["model.layers.2.embed_tokens.weight"] = np.zeros((3, 64), np.float32)

    bad_dir = _single_file_copy(hf_dir, str(tmp_path / "bad"), break_it)
    model_config = DeepseekV3Config.from_hf(bad_dir, compute_dtype="float32", seq_length=16)
    model = DeepseekV3ForCausalLM(model_config)
    before = {name: param.asnumpy().copy() for name, param in model.parameters_and_names()}
    with pytest.raises(CheckpointMismatchError) as error:
        load_hf_weights(model, bad_dir)
    message = str(error.value)
    for expected in ("2 missing", "model.layers.1.mlp.experts.3.up_proj.weight", "model.norm.weight",
                     "1 unexpected", "model.layers.1.mlp.experts.99.up_proj.weight",
                     "2 misshaped", "model.layers.0.self_attn.kv_b_proj.weight: [7, 32], expected [128, 32]",
                     "model.layers.2.embed_tokens.weight: [3, 64], expected [512, 64]", "nothing was loaded"):
        assert expected in message
    for name, param in model.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), before[name])


def test_checkpoint_without_mtp(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint
    no_mtp = _single_file_copy(hf_dir, str(tmp_path / "nomtp"), lambda tensors: [
        tensors.pop(name) for name in list(tensors) if name.startswith("model.layers.2.")])
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf(no_mtp, compute_dtype="float32", seq_length=16))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_hf_weights(model, no_mtp)
    summary = load_hf_weights(model, no_mtp, allow_missing_mtp=True)
    assert summary["notes"] and "no MTP layers" in summary["notes"][0]


def test_logits_tool_end_to_end(hf_checkpoint, tmp_path):
    from hf_reference import hf_logits

    hf_model, hf_dir = hf_checkpoint
    ids = np.random.RandomState(5).randint(0, 512, size=(2, 20))
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "logits.npy"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "logits.py"), "--checkpoint", hf_dir,
                             "--tokens", str(tmp_path / "ids.npy"), "--output", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (2, 20, 512)
    assert np.abs(logits - hf_logits(hf_model, ids)).max() <= 1e-4


def test_bf16_and_fp8_checkpoints_load(hf_checkpoint, tmp_path):
    from mindpretrain.checkpoint.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits
    from hf_reference import quantise_checkpoint_fp8, torch_block_dequantise

    _, hf_dir = hf_checkpoint
    originals = {}

    def to_bf16(tensors):
        for name in list(tensors):
            originals[name] = tensors[name]
            tensors[name] = (tensors[name], "BF16")

    bf16_dir = _single_file_copy(hf_dir, str(tmp_path / "bf16"), to_bf16)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf(bf16_dir, compute_dtype="float32", seq_length=16))
    load_hf_weights(model, bf16_dir)
    for name, param in model.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), bf16_bits_to_float32(float32_to_bf16_bits(originals[name])))

    fp8_dir = str(tmp_path / "fp8")
    quantised = quantise_checkpoint_fp8(hf_dir, fp8_dir)
    load_hf_weights(model, fp8_dir)
    params = dict(model.parameters_and_names())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in quantised
    for name, (codes, scale_inv) in quantised.items():
        np.testing.assert_allclose(params[name].asnumpy(), torch_block_dequantise(codes, scale_inv).numpy(),
                                   rtol=1e-6, atol=0)


def test_logits_of_native_checkpoint(hf_checkpoint, tmp_path):
    
    from mindpretrain.checkpoint.conversion import convert_hf_to_native
    from hf_reference import hf_logits

    hf_model, hf_dir = hf_checkpoint
    native_dir = str(tmp_path / "native")
    convert_hf_to_native(hf_dir, native_dir, dtype="fp32")
    from conftest import load_tool

    tool = load_tool("logits")
    ids = np.random.RandomState(6).randint(0, 512, size=(1, 12)).astype(np.int32)
    logits = tool.compute_logits(native_dir, ids)
    assert np.abs(logits - hf_logits(hf_model, ids)).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# GRAPH mode training step, plugin registration
# ---------------------------------------------------------------------------------------------------------------

class TrainStep(nn.Cell):
    """Like nn.TrainOneStepCell, but the network returns the 5-tuple: gradient of `loss` only (sens 1, 0, ...)."""

    def __init__(self, network, optimizer):
        super().__init__()
        self.network = network
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

    def construct(self, input_ids, labels, loss_mask):
        outputs = self.network(input_ids, labels, loss_mask)
        sens = (ops.ones_like(outputs[0]),) + tuple(ops.zeros_like(item) for item in outputs[1:])
        grads = self.grad(self.network, self.weights)(input_ids, labels, loss_mask, sens)
        self.optimizer(grads)
        return outputs


def test_graph_mode_train_step_and_bias_update():
    model_config = DeepseekV3Config(**dict(TINY, recompute=["full", "selective", "none"]))
    model = DeepseekV3ForCausalLM(model_config)
    step = TrainStep(model, nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-2))
    ids, labels, mask = tiny_batch(model_config, seed=4)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        losses = []
        for _ in range(3):
            loss, _, _, _, load = step(ids, labels, mask)
            losses.append(float(loss.asnumpy()))
        assert losses[2] < losses[0]
        # a large bias on expert 0 of every MoE block must route every token there in the compiled graph
        for bias in model.moe_layer_biases():
            bias.set_data(Tensor(np.array([10.0, 0, 0, 0], np.float32)))
        load = step(ids, labels, mask)[4].asnumpy()
        assert np.all(load[:, 0] == ids.shape[0] * ids.shape[1])
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_register_path_registers_one_set_of_classes():
    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    assert registry.get("config", "DeepseekV3Config") is DeepseekV3Config
    assert registry.get("model", "DeepseekV3ForCausalLM") is DeepseekV3ForCausalLM
    values = yaml_model_config(CONFIG_TINY)
    model_config = registry.build("config", dict(values, type="DeepseekV3Config"))
    assert model_config.hidden_size == 64 and model_config.vocab_size == 129280


def test_recomputing_attention_core_gradients_equal_autodiff():
    """The CPU attention core's hand-written backward (mla.RecomputingAttentionCore) against autodiff of the same
    forward (mla.AttentionCore, the Ascend core): equal outputs, and gradients of q, k, v equal up to float32
    summation order."""
    from research.deepseek3.mla import AttentionCore, RecomputingAttentionCore, causal_mask

    model_config = DeepseekV3Config(**TINY)
    rng = np.random.RandomState(11)
    batch, heads, seq = 2, model_config.num_attention_heads, model_config.seq_length
    query, key = (Tensor(rng.randn(batch, heads, seq, model_config.qk_head_dim).astype(np.float32)) for _ in range(2))
    value = Tensor(rng.randn(batch, heads, seq, model_config.v_head_dim).astype(np.float32))
    weights = Tensor(rng.randn(batch, heads, seq, model_config.v_head_dim).astype(np.float32))
    mask = causal_mask(seq)
    results = []
    for core in (AttentionCore(model_config), RecomputingAttentionCore(model_config)):
        def objective(q, k, v, core=core):
            return (core(q, k, v, mask) * weights).sum()

        value_out, grads = ms.value_and_grad(objective, grad_position=(0, 1, 2))(query, key, value)
        results.append((float(value_out.asnumpy()), [grad.asnumpy() for grad in grads]))
    (reference, reference_grads), (value_out, grads) = results
    assert value_out == pytest.approx(reference, rel=1e-6)
    for name, expected, actual in zip(("query", "key", "value"), reference_grads, grads):
        assert np.abs(expected).max() > 1e-2, name          # the comparison is not between zeros
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)
