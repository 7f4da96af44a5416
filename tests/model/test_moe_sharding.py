"""The MoE block's shard declarations: the router, the combine, the shared experts and the routed experts compute
through declared primitives, each planned with the strategy the shard table (research/deepseek3/sharding.py)
writes for the tensors the code really computes. Pure planning: nothing here needs Ascend."""
import numpy as np
import pytest

from mindspore import Tensor
from mindspore.ops import Primitive

from mindpretrain.config import load_config
from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.parallel.strategies import apply_shard_strategies, plan_shard_calls
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.moe import DeepseekV3MoE
from research.deepseek3.spec import SHARD_TABLE
from conftest import PROJECT_ROOT

TINY = "configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml"
PARALLEL = dict(data_parallel=4, model_parallel=2, expert_parallel=2)      # emp = mp = 2, no sequence split

# Written out by hand from the table for PARALLEL: (cell path inside the MoE block, attribute) -> (kind, strategy).
ROUTER_COMBINE_SHARED = {
    ("gate", "logits_matmul"): ("moe.router", ((4, 1), (1, 1))),             # replicated router weight
    ("gate", "sigmoid"): ("moe.router_sigmoid", ((4, 1),)),
    ("gate", "bias_add"): ("moe.router_bias_add", ((4, 1), (1,))),
    ("gate", "group_top2"): ("moe.group_top2", ((4, 1, 1),)),
    ("gate", "group_topk"): ("moe.group_topk", ((4, 1),)),
    ("gate", "topk"): ("moe.topk", ((4, 1),)),
    ("", "combine_mul"): ("moe.combine_mul", ((4, 1, 1), (4, 1, 1))),
    ("shared_experts.gate_proj", "matmul"): ("moe.shared_gate_proj", ((4, 1), (2, 1))),     # column parallel
    ("shared_experts.up_proj", "matmul"): ("moe.shared_up_proj", ((4, 1), (2, 1))),
    ("shared_experts.down_proj", "matmul"): ("moe.shared_down_proj", ((4, 2), (1, 2))),     # row parallel
    ("shared_experts", "sigmoid"): ("moe.shared_silu", ((4, 2),)),
    ("shared_experts", "silu_mul"): ("moe.shared_silu_mul", ((4, 2), (4, 2))),
    ("shared_experts", "gate_mul"): ("moe.shared_swiglu_mul", ((4, 2), (4, 2))),
}
# Block dispatch [blocks, b, H] x [blocks, I, H]^T: rows of a block over dp, the expert width over emp, blocks whole.
BLOCK_SPARSE_EXPERTS = {
    ("routed_compute", "gate_matmul"): ("moe.expert_gate_proj", ((1, 4, 1), (1, 2, 1))),
    ("routed_compute", "up_matmul"): ("moe.expert_up_proj", ((1, 4, 1), (1, 2, 1))),
    ("routed_compute", "silu"): ("moe.expert_silu", ((1, 4, 2),)),
    ("routed_compute", "swiglu_mul"): ("moe.expert_swiglu_mul", ((1, 4, 2), (1, 4, 2))),
    ("routed_compute", "down_matmul"): ("moe.expert_down_proj", ((1, 4, 2), (1, 1, 2))),
}
# The capacity dispatch's kinds (tests/model/test_capacity_dispatch.py) are declared by its own cell only.
# the kinds of the dispatches that store the experts stacked (capacity, exchanged): not the block-sparse MoE's
STACKED_KINDS = {kind for kind in SHARD_TABLE.op_kinds
                 if kind.startswith(("moe.capacity_", "moe.stacked_", "moe.exchanged_"))}
MOE_KINDS = {kind for kind in SHARD_TABLE.op_kinds if kind.startswith("moe.")} - STACKED_KINDS


def tiny_config(**overrides):
    section = dict(load_config(str(PROJECT_ROOT / TINY)).model.model_config)
    section.pop("type")
    return DeepseekV3Config(**{**section, "vocab_size": 512, "seq_length": 16, **overrides})


@pytest.fixture(scope="module")
def tiny_model():
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(tiny_config())


def plan(model, **parallel):
    return plan_shard_calls(model, ParallelConfig.from_dict(parallel), SHARD_TABLE)


def planned_inside(planned, prefix):
    """{(path relative to `prefix`, attribute): (kind, strategy)} of the planned calls at or under `prefix`."""
    inside = {}
    for path, attribute, kind, strategy in planned:
        if not prefix:
            inside[(path, attribute)] = (kind, strategy)
        elif path == prefix or path.startswith(prefix + "."):
            inside[(path[len(prefix) + 1:], attribute)] = (kind, strategy)
    return inside


def moe_paths(model):
    return [path for path, cell in model.cells_and_names() if isinstance(cell, DeepseekV3MoE)]


def test_every_moe_layer_plans_the_strategies_of_the_table(tiny_model):
    planned, unmatched = plan(tiny_model, **PARALLEL)
    paths = moe_paths(tiny_model)
    assert paths == [f"model.layers.{index}.mlp" for index in tiny_model.model_config.moe_layer_indices]   # MTP's too
    for path in paths:
        assert planned_inside(planned, path) == {**ROUTER_COMBINE_SHARED, **BLOCK_SPARSE_EXPERTS}, path
    # every moe.* kind of the table but the stacked dispatches' is declared by the block-sparse MoE
    assert {kind for kind in unmatched if kind.startswith("moe.")} == STACKED_KINDS
    assert {kind for kind, _ in planned_inside(planned, paths[0]).values()} == MOE_KINDS


def test_sequence_parallel_router_and_expert_tensor_parallel():
    """Under sequence parallelism the replicated router reads tokens split dp*sp; expert_model_parallel=1 keeps the
    routed experts' width whole while the shared experts still split theirs over mp. Expert parallelism (ep)
    changes no strategy of the block-sparse dispatch (the capacity dispatch splits its experts by it)."""
    moe = DeepseekV3MoE(tiny_config())
    parallel = dict(data_parallel=2, model_parallel=4, expert_parallel=2, use_seq_parallel=True,
                    expert_model_parallel=1)
    planned = planned_inside(plan(moe, **parallel)[0], "")
    assert planned[("gate", "logits_matmul")] == ("moe.router", ((8, 1), (1, 1)))
    assert planned[("gate", "topk")] == ("moe.topk", ((2, 1),))
    assert planned[("routed_compute", "gate_matmul")] == ("moe.expert_gate_proj", ((1, 2, 1), (1, 1, 1)))
    assert planned[("routed_compute", "down_matmul")] == ("moe.expert_down_proj", ((1, 2, 1), (1, 1, 1)))
    assert planned[("shared_experts.gate_proj", "matmul")] == ("moe.shared_gate_proj", ((2, 1), (4, 1)))
    assert planned[("shared_experts.down_proj", "matmul")] == ("moe.shared_down_proj", ((2, 4), (1, 4)))
    assert planned_inside(plan(moe, **{**parallel, "expert_parallel": 1})[0], "") == planned


def reference_kernel(x, weight, group_list):
    raise AssertionError("planning must not run the grouped matmul")


def test_grouped_matmul_dispatch_leaves_only_the_routed_expert_kinds_to_propagation():
    moe = DeepseekV3MoE(tiny_config(), dispatch="grouped_matmul", grouped_matmul=reference_kernel)
    planned, unmatched = plan(moe, **PARALLEL)
    assert planned_inside(planned, "") == ROUTER_COMBINE_SHARED
    assert {kind for kind in unmatched if kind.startswith("moe.")} == {
        kind for kind, _ in BLOCK_SPARSE_EXPERTS.values()} | STACKED_KINDS


@pytest.mark.parametrize("dispatch", ["block_sparse", "grouped_matmul"])
def test_every_primitive_of_the_moe_cells_is_declared(dispatch):
    """No name guessing: each primitive a moe.py cell holds is in its `shard_ops`; routed experts hold none."""
    moe = DeepseekV3MoE(tiny_config(), dispatch=dispatch, grouped_matmul=reference_kernel)
    declared = 0
    for path, cell in moe.cells_and_names():
        if type(cell).__module__ != "research.deepseek3.moe":
            continue
        primitives = {name for name, value in vars(cell).items() if isinstance(value, Primitive)}
        assert primitives == set(getattr(cell, "shard_ops", {})), (path, primitives)
        if path.startswith("experts."):
            assert not primitives, path
        declared += len(primitives)
    assert declared == (12 if dispatch == "block_sparse" else 7)   # router 6 + combine 1 (+ routed 5)
    weights = {name for name, _ in moe.parameters_and_names() if name.startswith("experts.0.")}
    assert weights == {"experts.0.gate_proj.weight", "experts.0.up_proj.weight", "experts.0.down_proj.weight"}


def test_forced_application_records_the_moe_strategies_and_outputs_do_not_change():
    moe = DeepseekV3MoE(tiny_config())
    hidden = Tensor(np.random.RandomState(0).randn(2, 16, moe.hidden_size).astype(np.float32))
    before = [item.asnumpy() for item in moe(hidden)]
    report = apply_shard_strategies(moe, ParallelConfig.from_dict(PARALLEL), SHARD_TABLE, force=True)
    assert report.applied and len(report.planned) == len(ROUTER_COMBINE_SHARED) + len(BLOCK_SPARSE_EXPERTS)
    assert moe.routed_compute.gate_matmul.attrs["in_strategy"] == ((1, 4, 1), (1, 2, 1))
    assert moe.gate.topk.attrs["in_strategy"] == ((4, 1),)
    assert moe.combine_mul.attrs["in_strategy"] == ((4, 1, 1), (4, 1, 1))
    for old, new in zip(before, [item.asnumpy() for item in moe(hidden)]):
        np.testing.assert_array_equal(new, old)
