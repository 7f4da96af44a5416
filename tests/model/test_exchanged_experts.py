"""The dropless exchanged dispatch (research/deepseek3/exchanged_experts.py): MindFormers' MoEV3 layout for semi-auto
expert parallelism.

On CPU: the Morph runs in GRAPH mode with ep = 1 (nothing exchanged) against an independent NumPy MoE and the block
dispatch, gradients included; two devices are emulated phase by phase (send side, AlltoAllV as NumPy, local experts,
back, combine) with uneven counts and a device whose experts get no token; the layout the shard table gives the
Morph and each rank's exchange group are checked as numbers. The AlltoAll/AlltoAllV collectives are Ascend-only."""
import types

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mindpretrain.parallel.expert_groups import ExpertExchange, semi_auto_exchange
from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.parallel.strategies import LayoutStrategy, apply_shard_strategies, op_strategy
from research.deepseek3.exchanged_experts import combine, local_expert_rows, send_side
from research.deepseek3.expert_parallel import emulated_alltoallv
from research.deepseek3.moe import DeepseekV3MoE
from research.deepseek3.spec import SHARD_TABLE
from test_capacity_dispatch import (EXPERTS, TOLERANCE, TOP_K, copy_weights, hf_arrays, hf_view, make_cfg,
                                    numpy_moe, random_hidden, swiglu)
from test_moe import _MoEGrad, loop_grouped_matmul, set_bias

IDLE = [3, EXPERTS - 1]                      # never chosen: their gradients must be exactly zero


@pytest.fixture(autouse=True)
def _seeded():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(1234)


def exchanged_moe(token_shards=1):
    cfg = types.SimpleNamespace(**vars(make_cfg(1.0)), moe_dispatch="grouped_matmul",
                                expert_exchange=ExpertExchange(1, token_shards=token_shards))
    return DeepseekV3MoE(cfg, grouped_matmul=loop_grouped_matmul)


def block_twin(source):
    block = DeepseekV3MoE(types.SimpleNamespace(**vars(make_cfg(1.0)), moe_dispatch="block_sparse"), block_size=4)
    copy_weights(source, block)
    return block


def named_grads(moe, x):
    """Gradients of the MoE's loss under HF's per-expert names (the stacked dispatch's split per expert)."""
    names = {id(param): name for name, param in moe.parameters_and_names()}
    grads = _MoEGrad(moe)(Tensor(x))
    return hf_view({names[id(param)]: Tensor(grad.asnumpy()) for param, grad in zip(moe.trainable_params(), grads)})


def test_graph_mode_output_and_gradients_match_numpy_and_the_block_dispatch():
    moe = exchanged_moe(token_shards=2)
    assert moe.exchanged and moe.stacked_experts and moe.experts.gate_proj.weight.shape == (EXPERTS, 16, 32)
    bias = np.zeros(EXPERTS, np.float32)
    bias[IDLE] = -10.0
    set_bias(moe, bias)
    block = block_twin(moe)
    x = random_hidden(31)
    expected = numpy_moe(moe, x.reshape(-1, x.shape[-1]), np.ones((x.size // x.shape[-1], TOP_K), bool))
    block_out = block(Tensor(x))[0].asnumpy()
    block_grads = named_grads(block, x)
    ms.set_context(mode=ms.GRAPH_MODE)                   # Morph runs in GRAPH mode only
    try:
        out, load, _ = moe(Tensor(x))
        grads = named_grads(moe, x)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(out.asnumpy().reshape(expected.shape), expected, **TOLERANCE)
    np.testing.assert_allclose(out.asnumpy(), block_out, **TOLERANCE)
    assert set(grads) == set(block_grads) == set(hf_arrays(moe)) - {"gate.e_score_correction_bias"}
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, block_grads[name], **TOLERANCE, err_msg=name)
    assert [int(load.asnumpy()[e]) for e in IDLE] == [0, 0]
    for e in IDLE:
        assert not np.any(grads[f"experts.{e}.gate_proj.weight"]) and not np.any(grads[f"experts.{e}.down_proj.weight"])
    assert np.abs(grads["experts.0.gate_proj.weight"]).max() > 0


def emulated_two_devices(moe, x2d, world=2):
    """The exchanged dispatch's data movement over `world` emulated devices, each with its token shard and its
    E/world experts: send side, AlltoAllV (NumPy), local experts, AlltoAllV back, combine -> ([N, H], counts)."""
    _, topk_idx, topk_weight = moe.gate(Tensor(x2d))
    shards = np.split(np.arange(x2d.shape[0]), world)
    per_rank = EXPERTS // world
    stacked = [moe.experts.gate_proj.weight.asnumpy(), moe.experts.up_proj.weight.asnumpy(),
               moe.experts.down_proj.weight.asnumpy()]
    sent = [send_side(Tensor(x2d[rows]), topk_idx[Tensor(rows)], EXPERTS, world, TOP_K) for rows in shards]
    counts = np.stack([item[2].asnumpy() for item in sent])                       # [source, destination]
    rows_in = emulated_alltoallv([item[0].asnumpy() for item in sent], counts)
    ids_in = emulated_alltoallv([item[1].asnumpy().reshape(-1, 1) for item in sent], counts)
    outputs = []
    for rank in range(world):
        weights = [Tensor(w[rank * per_rank:(rank + 1) * per_rank]) for w in stacked]
        local_ids = Tensor(ids_in[rank].reshape(-1).astype(np.int32) - rank * per_rank)
        outputs.append(local_expert_rows(Tensor(rows_in[rank]), local_ids, *weights, loop_grouped_matmul,
                                         ms.float32).asnumpy())
    returned = emulated_alltoallv(outputs, counts.T)
    out = np.concatenate([combine(Tensor(back), item[3], topk_weight[Tensor(rows)], TOP_K).asnumpy()
                          for back, item, rows in zip(returned, sent, shards)])
    return out, counts


@pytest.mark.parametrize("idle_rank", [None, 1])
def test_two_emulated_devices_reproduce_the_routed_output(idle_rank):
    moe = exchanged_moe()
    if idle_rank is not None:                            # device 1's experts get no token, only guard rows
        bias = np.zeros(EXPERTS, np.float32)
        bias[EXPERTS // 2:] = -10.0
        set_bias(moe, bias)
    x2d = random_hidden(37).reshape(-1, 32)
    out, counts = emulated_two_devices(moe, x2d)
    p = hf_arrays(moe)
    shared = swiglu(x2d, p["shared_experts.gate_proj.weight"], p["shared_experts.up_proj.weight"],
                    p["shared_experts.down_proj.weight"])
    expected = numpy_moe(moe, x2d, np.ones((x2d.shape[0], TOP_K), bool)) - shared
    np.testing.assert_allclose(out, expected, **TOLERANCE)
    guard = EXPERTS // 2                                 # every device sends one zero row to each of its experts
    assert counts.sum() == x2d.shape[0] * TOP_K + 2 * EXPERTS and (counts >= guard).all()
    if idle_rank is None:
        assert len(set(counts.reshape(-1).tolist())) > 1                 # uneven counts
    else:
        assert (counts[:, idle_rank] == guard).all()                     # only the guard rows reach it


def test_layout_of_mindformers_671b_mesh_and_exchange_groups():
    pc = ParallelConfig.from_dict(dict(data_parallel=16, model_parallel=4, expert_parallel=8, pipeline_stage=16,
                                       micro_batch_num=32, expert_model_parallel=1))
    layout = op_strategy("moe.exchanged_experts", pc, SHARD_TABLE)
    assert isinstance(layout, LayoutStrategy)
    assert layout.device_matrix == (8, 8) and layout.axis_names == ("replica", "ep")
    assert [layout.input_parts(i) for i in range(6)] == [(64, 1, 1)] * 3 + [(8, 1, 1)] * 3
    # rank 77: stage 1 (ranks 64-127), 13th device of its stage, position 5 of the group 72-79
    exchange = semi_auto_exchange(pc, 77)
    assert (exchange.position, exchange.group_ranks, exchange.token_shards) == (5, tuple(range(72, 80)), 64)
    assert exchange.group == "expert_exchange_72_8"
    assert semi_auto_exchange(ParallelConfig.from_dict(dict(data_parallel=2)), 1).group is None


def test_forced_application_records_the_layout_on_the_morph():
    moe = exchanged_moe()
    pc = ParallelConfig.from_dict(dict(data_parallel=2, model_parallel=2, expert_parallel=4,
                                       expert_model_parallel=1))
    report = apply_shard_strategies(moe, pc, SHARD_TABLE, force=True)
    assert report.applied and "moe.exchanged_experts" not in report.unmatched_kinds
    morph = moe.routed_compute.exchange
    in_layout = morph.attrs["in_layout"]
    assert len(in_layout) == 6 and in_layout[0]["device_matrix"] == (1, 4)
    assert in_layout[0]["tensor_map"] == ((1, 0), -1, -1) and in_layout[3]["tensor_map"] == (0, -1, -1)
