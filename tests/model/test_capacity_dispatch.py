"""The capacity dispatch (research/deepseek3/capacity_dispatch.py): MindFormers' per-expert capacity layout.

Checked against the block-sparse dispatch when nothing is dropped, against an independent NumPy re-derivation of
the slots (k-major, per data-parallel shard) when the capacity drops assignments, and its shard strategies (experts
over ep, tokens over dp) as the table resolves them and as they are recorded on the primitives."""
import math
import types

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor
from mindspore.ops import Primitive

from mindpretrain.config import load_config
from mindpretrain.parallel.expert_groups import gather_full_tensors, model_arrays
from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.parallel.strategies import apply_shard_strategies, op_strategies, op_strategy
from mindpretrain.validation import ConfigError
from research.deepseek3.capacity_dispatch import CapacityExperts, capacity_footprint, expert_capacity, \
    set_dp_groups
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.moe import DeepseekV3MoE, StackedRoutedExperts
from research.deepseek3.spec import SHARD_TABLE
from conftest import PROJECT_ROOT

HIDDEN, INTER, EXPERTS, TOP_K = 32, 16, 8, 2
BATCH, SEQ = 2, 12
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
WEIGHT_KINDS = {"moe.stacked_gate_weight", "moe.stacked_up_weight", "moe.stacked_down_weight"}   # the storage
CAPACITY_KINDS = {kind for kind in SHARD_TABLE.op_kinds if kind.startswith("moe.capacity_")} | WEIGHT_KINDS


@pytest.fixture(autouse=True)
def _seeded():
    ms.set_context(mode=ms.PYNATIVE_MODE)      # whatever an earlier test module left; one test compiles itself
    ms.set_seed(1234)


def make_cfg(capacity_factor):
    return types.SimpleNamespace(hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=EXPERTS,
                                 num_experts_per_tok=TOP_K, n_group=4, topk_group=2, norm_topk_prob=True,
                                 routed_scaling_factor=2.5, n_shared_experts=1, initializer_range=0.2,
                                 compute_dtype="float32", param_init_type="float32", seq_balance_loss_alpha=0.0,
                                 moe_capacity_factor=capacity_factor)


def random_hidden(seed=0):
    return np.random.RandomState(seed).randn(BATCH, SEQ, HIDDEN).astype(np.float32)


def hf_view(named):
    """{name: array} under HF's per-expert names of a block's {name: tensor} (the capacity dispatch stores its
    experts stacked); the names are the block's own, seen under the `mlp.` the model would give them."""
    full = gather_full_tensors({f"mlp.{name}": value for name, value in named.items()}, None)
    return {name[len("mlp."):]: array for name, array in full.items()}


def hf_arrays(moe):
    return hf_view(dict(moe.parameters_and_names()))


def copy_weights(source, target):
    params = {f"mlp.{name}": param for name, param in target.parameters_and_names()}
    arrays = model_arrays({name: tuple(param.shape) for name, param in params.items()},
                          {f"mlp.{name}": array for name, array in hf_arrays(source).items()})
    assert set(arrays) == set(params)
    for name, array in arrays.items():
        params[name].set_data(Tensor(np.ascontiguousarray(array)))


# ------------------------------------------------------------------------------------- NumPy re-derivation
def numpy_slots(topk_idx, groups, order="k_major"):
    """Slot of each (token, k) assignment, counted per shard of N/groups tokens and per expert, by plain loops."""
    tokens, top_k = topk_idx.shape
    per_group = tokens // groups
    slots = np.zeros_like(topk_idx)
    for group in range(groups):
        seen = {}
        pairs = [(t, k) for k in range(top_k) for t in range(per_group)] if order == "k_major" else \
            [(t, k) for t in range(per_group) for k in range(top_k)]
        for t, k in pairs:
            row = group * per_group + t
            expert = int(topk_idx[row, k])
            slots[row, k] = seen.get(expert, 0)
            seen[expert] = slots[row, k] + 1
    return slots


def swiglu(x, gate, up, down):
    g = x @ gate.T
    return (g / (1.0 + np.exp(-g)) * (x @ up.T)) @ down.T


def numpy_moe(moe, x2d, kept):
    """Shared expert + sum over the kept assignments of router weight * expert(x), from the Parameters."""
    p = hf_arrays(moe)
    _, topk_idx, topk_weight = [item.asnumpy() for item in moe.gate(Tensor(x2d))]
    out = swiglu(x2d, p["shared_experts.gate_proj.weight"], p["shared_experts.up_proj.weight"],
                 p["shared_experts.down_proj.weight"])
    for t in range(x2d.shape[0]):
        for k in range(TOP_K):
            if kept[t, k]:
                e = topk_idx[t, k]
                out[t] += topk_weight[t, k] * swiglu(x2d[t], p[f"experts.{e}.gate_proj.weight"],
                                                     p[f"experts.{e}.up_proj.weight"],
                                                     p[f"experts.{e}.down_proj.weight"])
    return out


def routing(moe, x2d):
    return moe.gate(Tensor(x2d))[1].asnumpy()


# ------------------------------------------------------------------------------------------------ semantics
def grads(moe, x, cotangent):
    weights = moe.trainable_params()

    def loss_fn(hidden):
        return (moe(hidden)[0] * cotangent).sum()

    _, (x_grad, weight_grads) = ms.value_and_grad(loss_fn, 0, weights)(Tensor(x))
    return x_grad.asnumpy(), hf_view({param.name: grad for param, grad in zip(weights, weight_grads)})


def test_without_drops_the_capacity_dispatch_equals_block_sparse_forward_and_gradients():
    factor = EXPERTS / TOP_K                 # C = n: every assignment fits
    capacity_moe = DeepseekV3MoE(make_cfg(factor), dispatch="capacity")
    block_moe = DeepseekV3MoE(make_cfg(factor), dispatch="block_sparse")
    copy_weights(block_moe, capacity_moe)
    assert capacity_moe.routed_compute.capacity_factor == factor
    x = random_hidden()
    topk_idx = routing(block_moe, x.reshape(-1, HIDDEN))
    assert numpy_slots(topk_idx, 1).max() < BATCH * SEQ
    slot_token, _ = capacity_moe.routed_compute.indices(
        Tensor(topk_idx.reshape(1, -1, TOP_K)), Tensor(numpy_slots(topk_idx, 1).reshape(1, -1, TOP_K)), BATCH * SEQ)
    empty = slot_token.asnumpy() == BATCH * SEQ              # C = n slots per expert, N*K of them taken
    assert empty.sum() == EXPERTS * BATCH * SEQ - BATCH * SEQ * TOP_K
    for ours, theirs in zip(capacity_moe(Tensor(x)), block_moe(Tensor(x))):
        np.testing.assert_allclose(ours.asnumpy(), theirs.asnumpy(), **TOLERANCE)
    cotangent = Tensor(np.random.RandomState(1).randn(BATCH, SEQ, HIDDEN).astype(np.float32))
    x_grad, weight_grads = grads(capacity_moe, x, cotangent)
    block_x_grad, block_weight_grads = grads(block_moe, x, cotangent)
    np.testing.assert_allclose(x_grad, block_x_grad, **TOLERANCE)
    assert set(weight_grads) == set(block_weight_grads) and "experts.3.down_proj.weight" in weight_grads
    for name, grad in block_weight_grads.items():
        np.testing.assert_allclose(weight_grads[name], grad, **TOLERANCE, err_msg=name)
    assert np.abs(weight_grads["gate.weight"]).max() > 0        # the router weights are trained through the combine


def test_small_capacity_drops_exactly_the_assignments_past_the_capacity_k_major():
    factor = 0.5
    moe = DeepseekV3MoE(make_cfg(factor), dispatch="capacity")
    x2d = random_hidden(2).reshape(-1, HIDDEN)
    capacity = math.ceil(TOP_K * BATCH * SEQ * factor / EXPERTS)
    assert capacity == expert_capacity(BATCH * SEQ, TOP_K, EXPERTS, factor) == 3
    topk_idx = routing(moe, x2d)
    slots = numpy_slots(topk_idx, 1)
    kept = slots < capacity
    # the case discriminates: some assignments drop, and token-major counting would drop others
    assert 0 < (~kept).sum() < kept.size
    assert ((numpy_slots(topk_idx, 1, order="token_major") < capacity) != kept).any()

    cell = moe.routed_compute
    ms_slots = cell.slots(Tensor(topk_idx.reshape(1, -1, TOP_K))).asnumpy().reshape(-1, TOP_K)
    np.testing.assert_array_equal(ms_slots, slots)
    slot_token, combine_index = [item.asnumpy()[0] for item in cell.indices(
        Tensor(topk_idx.reshape(1, -1, TOP_K)), Tensor(slots.reshape(1, -1, TOP_K).astype(np.int32)), capacity)]
    rows, tokens = EXPERTS * capacity, BATCH * SEQ
    expected_token = np.full(rows, tokens)                   # n: an empty slot reads the zero row
    expected_index = np.full((tokens, TOP_K), rows)          # E*C: a dropped assignment reads the zero row
    for t, k in zip(*np.nonzero(kept)):
        expected_token[topk_idx[t, k] * capacity + slots[t, k]] = t
        expected_index[t, k] = topk_idx[t, k] * capacity + slots[t, k]
    assert slot_token.dtype == combine_index.dtype == np.int32
    np.testing.assert_array_equal(slot_token, expected_token)
    np.testing.assert_array_equal(combine_index.reshape(tokens, TOP_K), expected_index)
    assert (slot_token < tokens).sum() == kept.sum() == rows        # here every slot is taken
    for t, k in zip(*np.nonzero(~kept)):                   # a dropped assignment holds no slot of its expert
        expert = topk_idx[t, k]
        assert t not in slot_token[expert * capacity:(expert + 1) * capacity]

    out = moe(Tensor(x2d.reshape(BATCH, SEQ, HIDDEN)))[0].asnumpy().reshape(-1, HIDDEN)
    np.testing.assert_allclose(out, numpy_moe(moe, x2d, kept), **TOLERANCE)
    assert np.abs(out - numpy_moe(moe, x2d, np.ones_like(kept))).max() > 1e-3    # the drops change the output


def test_two_data_parallel_shards_count_slots_and_capacity_per_shard():
    factor = 0.5
    moe = DeepseekV3MoE(make_cfg(factor), dispatch="capacity")
    assert set_dp_groups(moe, 2) == 1 and moe.routed_compute.dp_groups == 2
    x2d = random_hidden(4).reshape(-1, HIDDEN)
    capacity = expert_capacity(BATCH * SEQ // 2, TOP_K, EXPERTS, factor)
    assert capacity == math.ceil(TOP_K * 12 * factor / EXPERTS) == 2
    topk_idx = routing(moe, x2d)
    kept = numpy_slots(topk_idx, 2) < capacity
    assert 0 < (~kept).sum() and ((numpy_slots(topk_idx, 1) < 3) != kept).any()   # not the one-shard drop set
    out = moe(Tensor(x2d.reshape(BATCH, SEQ, HIDDEN)))[0].asnumpy().reshape(-1, HIDDEN)
    np.testing.assert_allclose(out, numpy_moe(moe, x2d, kept), **TOLERANCE)
    with pytest.raises(ValueError, match=r"\(24\) must be a multiple of the data-parallel shards \(5\)"):
        set_dp_groups(moe, 5)
        moe(Tensor(x2d.reshape(BATCH, SEQ, HIDDEN)))


def test_capacity_and_footprint_by_hand():
    assert expert_capacity(4096, 8, 256, 1.5) == 192 and expert_capacity(4096, 8, 256, 1.1) == 141   # ceil(140.8)
    assert expert_capacity(4, 2, 8, 100.0) == 4 and expert_capacity(4, 1, 8, 0.01) == 1              # [1, n]
    footprint = capacity_footprint(4096, 8, 256, 1.5, 7168)       # DeepSeek-V3 671B, seq 4096, batch 1 per shard
    assert footprint["capacity"] == 192 and footprint["expert_rows"] == 256 * 192 == 49152
    assert footprint["routed_rows"] == 8 * 4096 == 32768
    assert footprint["slot_token_elements"] == 49152 and footprint["combine_index_elements"] == 32768
    assert footprint["index_elements"] == 81920                  # int32; the [n, E, C] masks were 201,326,592 each
    assert footprint["assignment_onehot_elements"] == 8 * 4096 * 256 == 8_388_608
    assert footprint["expert_input_elements"] == 49152 * 7168
    assert footprint["gathered_output_elements"] == 32768 * 7168


# ------------------------------------------------------------------------------------------------- config
def test_capacity_factor_is_read_from_moe_config_and_reported_only_where_it_has_no_effect():
    assert DeepseekV3Config().moe_capacity_factor == 1.1
    honoured = DeepseekV3Config(moe_config={"capacity_factor": 1.5}, moe_dispatch="capacity")
    assert honoured.moe_capacity_factor == 1.5 and "moe_config.capacity_factor" not in honoured.no_effect_keys
    ignored = DeepseekV3Config(moe_config={"capacity_factor": 1.5}, moe_dispatch="block_sparse")
    assert ignored.moe_capacity_factor == 1.5 and "moe_config.capacity_factor" in ignored.no_effect_keys
    assert "moe_config.capacity_factor" in DeepseekV3Config(moe_config={"capacity_factor": 1.5}).no_effect_keys
    with pytest.raises(ConfigError, match=r"moe_capacity_factor \(0\) must be a number > 0"):
        DeepseekV3Config(moe_config={"capacity_factor": 0}, moe_dispatch="capacity")


# ---------------------------------------------------------------------------------------------- strategies
def tiny_model_config(**overrides):
    section = dict(load_config(str(PROJECT_ROOT / "configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml"))
                   .model.model_config)
    section.pop("type")
    return DeepseekV3Config(**{**section, "vocab_size": 512, "seq_length": 16, "moe_dispatch": "capacity",
                               **overrides})


@pytest.mark.parametrize("dp, ep, dp_ep", [(4, 4, 1), (8, 4, 2)])
def test_table_splits_experts_by_ep_and_tokens_by_dp(dp, ep, dp_ep):
    pc = ParallelConfig.from_dict(dict(data_parallel=dp, model_parallel=2, expert_parallel=ep))   # emp = mp = 2
    strategies = op_strategies(pc, SHARD_TABLE)
    assert len(CAPACITY_KINDS) == 27
    # the stacked expert Parameters are read through casts split like the matmuls' weights: E/ep per device
    assert strategies["moe.stacked_gate_weight"] == strategies["moe.stacked_up_weight"] == ((ep, 2, 1),)
    assert strategies["moe.stacked_down_weight"] == ((ep, 1, 2),)
    for kind in ("moe.capacity_gate_proj", "moe.capacity_up_proj"):      # [E, dp*C, H] x [E, I, H]^T
        assert strategies[kind] == ((ep, dp_ep, 1), (ep, 2, 1)), kind
    assert strategies["moe.capacity_down_proj"] == ((ep, dp_ep, 2), (ep, 1, 2))
    assert strategies["moe.capacity_silu"] == ((ep, dp_ep, 2),)
    assert strategies["moe.capacity_swiglu_mul"] == ((ep, dp_ep, 2),) * 2
    assert strategies["moe.capacity_to_experts"] == ((dp_ep, ep, 1, 1),)       # [dp, E, C, H]: E over ep
    assert strategies["moe.capacity_from_experts"] == ((ep, dp_ep, 1, 1),)     # [E, dp, C, H]
    for kind in ("moe.capacity_dispatch", "moe.capacity_combine"):     # Gather(batch_dims=1): [dp, rows, H], [dp, m]
        assert strategies[kind] == ((dp, 1, 1), (dp, 1)), kind
    assert strategies["moe.capacity_slot_scatter"] == ((dp, 1),) * 3
    assert not {kind for kind in CAPACITY_KINDS if "mask" in kind}      # no [n, E, C] mask is built any more
    assert strategies["moe.capacity_assignment_onehot"] == ((dp, 1, 1), (), ())
    expert_side = {f"moe.capacity_{name}" for name in ("to_experts", "gate_proj", "up_proj", "silu", "swiglu_mul",
                                                        "down_proj", "from_experts")} | WEIGHT_KINDS
    for kind in CAPACITY_KINDS - expert_side:                  # the token side: [dp, ...] split by dp, nothing else
        for entry in strategies[kind]:
            assert entry == () or entry == (dp,) + (1,) * (len(entry) - 1), (kind, entry)


def test_forced_application_records_every_capacity_strategy_and_the_output_does_not_change():
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(tiny_model_config())
    ids = Tensor(np.arange(16, dtype=np.int32).reshape(2, 8))
    before = model(ids).asnumpy()
    pc = ParallelConfig.from_dict(dict(data_parallel=4, model_parallel=2, expert_parallel=4))
    report = apply_shard_strategies(model, pc, SHARD_TABLE, force=True)
    assert report.applied and not CAPACITY_KINDS & set(report.unmatched_kinds)
    cells = [(path, cell) for path, cell in model.cells_and_names() if isinstance(cell, CapacityExperts)]
    assert [path for path, _ in cells] == [f"model.layers.{index}.mlp.routed_compute"
                                           for index in model.model_config.moe_layer_indices]
    for path, cell in cells:
        primitives = {name for name, value in vars(cell).items() if isinstance(value, Primitive)}
        assert primitives == set(cell.shard_ops) and len(primitives) == 27, path
        assert set(cell.shard_ops.values()) == CAPACITY_KINDS - WEIGHT_KINDS
        for attribute, kind in cell.shard_ops.items():
            assert getattr(cell, attribute).attrs["in_strategy"] == op_strategy(kind, pc, SHARD_TABLE), attribute
        assert cell.gate_matmul.attrs["in_strategy"] == ((4, 1, 1), (4, 2, 1))
    storages = [cell for _, cell in model.cells_and_names() if isinstance(cell, StackedRoutedExperts)]
    assert len(storages) == len(cells)
    for storage in storages:           # each expert Parameter [E, I, H] is consumed split (ep, emp, 1) only
        assert storage.gate_proj.weight.shape[0] == model.model_config.n_routed_experts
        assert storage.cast_gate.attrs["in_strategy"] == ((4, 2, 1),)
        assert storage.cast_down.attrs["in_strategy"] == ((4, 1, 2),)
    np.testing.assert_array_equal(model(ids).asnumpy(), before)


def test_graph_mode_forward_of_a_tiny_model_equals_pynative():
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(tiny_model_config(moe_capacity_factor=0.5))
    ids = Tensor((np.arange(32, dtype=np.int32).reshape(2, 16) * 37) % 512)
    eager = model(ids).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = model(ids).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert graph.shape == (2, 16, 512) and np.isfinite(graph).all()
    np.testing.assert_allclose(graph, eager, **TOLERANCE)
