"""Weight shard layouts and op shard strategies: shapes multiply back, strategies agree with each other."""
import math

import pytest

from mindpretrain.config import load_config

from mindpretrain.validation import ConfigError
from mindpretrain.parallel.layouts import weight_kind, weight_layouts
from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.parallel.pipeline import place_layers
from mindpretrain.parallel.strategies import LayoutStrategy, apply_shard_strategies, op_strategies
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.sharding import MATMUL_OPS, OP_KINDS, WEIGHT_KINDS
from research.deepseek3.spec import SHARD_TABLE
from research.deepseek3.weight_mapping import hf_parameter_shapes
from conftest import PROJECT_ROOT

KIND_SPLITS = SHARD_TABLE.kind_splits

CONFIGS = {
    "671b": "research/deepseek3/deepseek3_671b/pretrain_deepseek3_671b.yaml",
    "1b": "research/deepseek3/deepseek3_671b/pretrain_deepseek3_1b.yaml",
    "tiny": "configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml",
}


def model_config(name):
    section = dict(load_config(str(PROJECT_ROOT / CONFIGS[name])).model.model_config)
    section.pop("type")
    return DeepseekV3Config(**section)


@pytest.fixture(scope="module")
def shapes_671b():
    return hf_parameter_shapes(model_config("671b"))


LAYOUTS_671B = [
    dict(data_parallel=16, model_parallel=4, expert_parallel=8, pipeline_stage=16, micro_batch_num=32,
         use_seq_parallel=True, offset=[1] * 15 + [-1]),
    dict(data_parallel=8, model_parallel=8, expert_parallel=8, pipeline_stage=16, micro_batch_num=16,
         vocab_emb_dp=False, offset=[1] * 15 + [-1], expert_model_parallel=1),
    dict(data_parallel=64, model_parallel=16, expert_parallel=64, pipeline_stage=1),
]


@pytest.mark.parametrize("values", LAYOUTS_671B)
def test_shard_shapes_multiply_back_to_full_shapes(shapes_671b, values):
    pc = ParallelConfig.from_dict(values)
    cfg = model_config("671b")
    placement = pc.validate(cfg, pc.device_num)
    layouts = weight_layouts(shapes_671b, pc, placement, SHARD_TABLE)
    assert len(layouts) == len(shapes_671b)
    held = 0
    for layout in layouts:
        assert tuple(s * p for s, p in zip(layout.shard_shape, layout.split)) == layout.shape, layout
        # the stage's devices hold every weight exactly `replicas` times
        copies_per_stage = pc.devices_per_stage // layout.replicas
        assert copies_per_stage == math.prod(layout.split) * layout.expert_parallel, layout
        held += layout.numel_per_device * pc.devices_per_stage / layout.replicas
        assert layout.stages and all(0 <= stage < pc.pipeline_stage for stage in layout.stages)
    assert held == pytest.approx(sum(math.prod(shape) for shape in shapes_671b.values()))


def test_kinds_of_the_671b_weights(shapes_671b):
    pc = ParallelConfig.from_dict(LAYOUTS_671B[0])
    placement = place_layers(model_config("671b"), pc)
    by_name = {layout.name: layout for layout in weight_layouts(shapes_671b, pc, placement, SHARD_TABLE)}
    q_b = by_name["model.layers.0.self_attn.q_b_proj.weight"]
    assert q_b.shape == (128 * 192, 1536) and q_b.shard_shape == (32 * 192, 1536)     # 32 of 128 heads
    o_proj = by_name["model.layers.5.self_attn.o_proj.weight"]
    assert o_proj.shard_shape == (7168, 32 * 128) and o_proj.stages == (1,)
    expert = by_name["model.layers.3.mlp.experts.255.down_proj.weight"]
    assert expert.kind == "moe.expert_down_proj" and expert.expert_parallel == 8
    assert expert.shard_shape == (7168, 512) and expert.replicas == 2        # 64 devices / (8 ep * 4 tp)
    assert by_name["model.layers.3.mlp.gate.e_score_correction_bias"].replicas == 64
    assert by_name["model.embed_tokens.weight"].stages == (0, 15)          # MTP reads the embedding on stage 15
    assert by_name["lm_head.weight"].stages == (15,)
    assert by_name["model.layers.61.eh_proj.weight"].stages == (15,)


def test_every_weight_name_has_exactly_one_kind():
    import re

    for name in ("tiny", "1b"):
        for weight in hf_parameter_shapes(model_config(name)):
            matching = [kind for kind, pattern, _, _ in WEIGHT_KINDS if re.match(pattern + "$", weight)]
            assert len(matching) == 1, (weight, matching)
    no_q_lora = DeepseekV3Config(q_lora_rank=None, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8,
                                 n_group=2,
                                 topk_group=1, num_experts_per_tok=2)
    assert weight_kind("model.layers.0.self_attn.q_proj.weight", SHARD_TABLE)[0] == "attention.q_proj"
    assert "model.layers.0.self_attn.q_proj.weight" in hf_parameter_shapes(no_q_lora)
    with pytest.raises(ConfigError, match="matches no weight kind"):
        weight_kind("model.layers.0.self_attn.rotary.inv_freq", SHARD_TABLE)


# ------------------------------------------------------------------------------------------ strategies
STRATEGY_LAYOUTS = [
    dict(),
    dict(data_parallel=16, model_parallel=4, expert_parallel=8, pipeline_stage=16, micro_batch_num=32,
         use_seq_parallel=True),
    dict(data_parallel=4, model_parallel=2, expert_parallel=4, vocab_emb_dp=False),
    dict(data_parallel=8, model_parallel=8, expert_parallel=2, expert_model_parallel=2),
]


@pytest.mark.parametrize("values", STRATEGY_LAYOUTS)
def test_strategies_are_consistent(values):
    pc = ParallelConfig.from_dict(values)
    strategies = op_strategies(pc, SHARD_TABLE)
    dp, mp = pc.data_parallel, pc.model_parallel
    assert set(strategies) == set(OP_KINDS)
    for kind, strategy in strategies.items():
        if isinstance(strategy, LayoutStrategy):            # a device matrix of the stage's devices
            assert math.prod(strategy.device_matrix) == dp * mp, (kind, strategy)
            strategy = tuple(strategy.input_parts(index) for index in range(len(strategy.inputs)))
        for entry in strategy:
            assert all(isinstance(part, int) and part >= 1 for part in entry), (kind, strategy)
            assert pc.devices_per_stage % math.prod(entry) == 0, (kind, strategy)
    for kind in MATMUL_OPS:                    # x [T, in] @ W[out, in]^T
        x, weight = strategies[kind]
        assert weight == tuple(1 if symbol is None else {"mp": mp, "emp": pc.expert_tensor_parallel,
                                                          "vocab": pc.vocab_parallel}[symbol]
                               for symbol in KIND_SPLITS[kind]), kind
        assert x[1] == weight[1], kind        # contracted dimension split alike
    q, k = strategies["attention.qk_bmm"]
    assert q == k == (dp, mp, 1, 1)           # heads over model parallel, contracted head dim whole
    probs, value = strategies["attention.pv_bmm"]
    assert probs[:2] == value[:2] and probs[3] == value[2] == 1
    assert strategies["attention.softmax"] == ((dp, mp, 1, 1),)
    x, weight = strategies["moe.expert_gate_proj"]
    # block dispatch: blocks stay whole (each gathers its expert's weights), rows over dp, width over emp
    assert x == (1, dp, 1) and weight == (1, pc.expert_tensor_parallel, 1)
    h, weight = strategies["moe.expert_down_proj"]
    assert h[2] == weight[2] == pc.expert_tensor_parallel
    table, ids = strategies["embedding.gather"]
    assert table == (pc.vocab_parallel, 1) and ids == (dp, 1)
    assert strategies["lm_head"][1] == (pc.vocab_parallel, 1)
    assert strategies["norm"][0] == (dp, pc.sequence_parallel, 1)


@pytest.fixture(scope="module")
def tiny_model():
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{**model_config("tiny").to_dict(), "vocab_size": 512, "seq_length": 16})
    return DeepseekV3ForCausalLM(cfg)


def test_apply_is_skipped_clearly_outside_semi_auto_parallel(tiny_model):
    import mindspore as ms

    pc = ParallelConfig.from_dict(dict(data_parallel=2, model_parallel=2, expert_parallel=2))
    assert ms.get_auto_parallel_context("parallel_mode") == "stand_alone"
    report = apply_shard_strategies(tiny_model, pc, SHARD_TABLE)
    assert not report.applied and "stand_alone" in report.reason
    planned = {(path, attribute): (kind, strategy) for path, attribute, kind, strategy in report.planned}
    # written out by hand from the layouts: column-parallel q_b [heads split], row-parallel o_proj
    assert planned[("model.layers.0.self_attn.q_b_proj", "matmul")] == ("attention.q_b_proj", ((2, 1), (2, 1)))
    assert planned[("model.layers.0.self_attn.o_proj", "matmul")] == ("attention.o_proj", ((2, 2), (1, 2)))
    assert planned[("model.embed_tokens", "gather")] == ("embedding.gather", ((1, 1), (2, 1)))
    assert planned[("model.layers.1.self_attn.core", "scores_matmul")] == ("attention.qk_bmm",
                                                                           ((2, 2, 1, 1), (2, 2, 1, 1)))
    assert planned[("lm_head", "matmul")] == ("lm_head", ((2, 1), (1, 1)))     # vocab_emb_dp: head not split
    assert planned[("model.norm", "weight_mul")] == ("norm", ((2, 1, 1), (1,)))
    assert planned[("lm_head.cross_entropy", "log_softmax")] == ("loss.log_softmax", ((2, 1),))
    # the MTP block's own embedding cell is sharded like the main one
    mtp = f"model.layers.{tiny_model.model_config.num_hidden_layers}"
    assert planned[(f"{mtp}.embed_tokens", "gather")] == ("embedding.gather", ((1, 1), (2, 1)))
    kinds = {kind for kind, _ in planned.values()}
    assert {"attention.kv_b_proj", "attention.softmax", "attention.latent_norm.rsqrt", "mlp.gate_proj",
            "mlp.silu", "residual_add", "mtp.eh_proj", "mtp.concat", "loss.nll_gather"} <= kinds
    # what no cell declares is reported: RoPE (functional ops), q_proj (this config has a q LoRA) and the
    # stacked dispatches' kinds (capacity, exchanged; this model uses block_sparse)
    capacity_kinds = {kind for kind in OP_KINDS if kind.startswith(("moe.capacity_", "moe.stacked_", "moe.exchanged_"))}
    assert set(report.unmatched_kinds) == set(OP_KINDS) - kinds == {
        "attention.rope_mul", "attention.k_rope_mul", "attention.k_pe_broadcast", "attention.q_proj",
        "attention.flash_attention", "attention.value_pad"} | capacity_kinds   # no Ascend flash core on CPU


def test_every_primitive_of_the_model_cells_is_declared(tiny_model):
    """No name guessing: every primitive our cells hold is in their `shard_ops`."""
    from mindspore.ops import Primitive

    own_modules = {"research.deepseek3.layers", "research.deepseek3.mla", "research.deepseek3.decoder",
                   "research.deepseek3.mtp", "research.deepseek3.head", "research.deepseek3.deepseek3_model",
                   "research.deepseek3.moe"}
    checked = 0
    for path, cell in tiny_model.cells_and_names():
        if type(cell).__module__ not in own_modules:
            continue
        primitives = {name for name, value in vars(cell).items() if isinstance(value, Primitive)}
        assert primitives == set(getattr(cell, "shard_ops", {})), (path, primitives)
        checked += len(primitives)
    assert checked > 100


def test_forced_application_sets_every_declared_strategy_and_outputs_do_not_change(tiny_model):
    """On CPU, `force=True` exercises the apply path: every declared primitive records its strategy (read back
    from the primitive; stand-alone execution ignores it) and the model computes exactly what it did before."""
    import numpy as np
    import mindspore as ms

    from mindpretrain.parallel.strategies import op_strategy

    ids = ms.Tensor(np.arange(16, dtype=np.int32).reshape(2, 8))
    labels = ms.Tensor((np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % 512)
    before = [tiny_model(ids).asnumpy()] + [item.asnumpy() for item in tiny_model(ids, labels)]
    pc = ParallelConfig.from_dict(dict(data_parallel=2, model_parallel=2, expert_parallel=2, use_seq_parallel=True))
    report = apply_shard_strategies(tiny_model, pc, SHARD_TABLE, force=True)
    assert report.applied and len(report.planned) > 100
    cells = dict(tiny_model.cells_and_names())
    for path, attribute, kind, strategy in report.planned:
        primitive = getattr(cells[path], attribute)
        assert primitive.attrs["in_strategy"] == strategy == op_strategy(kind, pc, SHARD_TABLE), (path, attribute)
    o_proj = tiny_model.model.layers[0].self_attn.o_proj.matmul       # row parallel: reduce-scatter under SP
    assert o_proj.attrs["in_strategy"] == ((2, 2), (1, 2)) and o_proj.attrs["out_strategy"] == ((4, 1),)
    core = tiny_model.model.layers[0].self_attn.core
    assert core.softmax.attrs["in_strategy"] == ((2, 2, 1, 1),)
    assert tiny_model.model.layers[0].input_layernorm.square.attrs["in_strategy"] == ((2, 2, 1),)
    after = [tiny_model(ids).asnumpy()] + [item.asnumpy() for item in tiny_model(ids, labels)]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)


def test_row_parallel_projections_reduce_scatter_under_sequence_parallel():
    from mindpretrain.parallel.strategies import op_out_strategy

    pc = ParallelConfig.from_dict(dict(data_parallel=2, model_parallel=4, use_seq_parallel=True))
    assert op_out_strategy("attention.o_proj", pc, SHARD_TABLE) == ((8, 1),)
    assert op_out_strategy("mlp.down_proj", pc, SHARD_TABLE) == ((8, 1),)
    assert op_out_strategy("attention.q_b_proj", pc, SHARD_TABLE) is None
    assert op_out_strategy("attention.o_proj", ParallelConfig.from_dict(dict(model_parallel=4)), SHARD_TABLE) is None
