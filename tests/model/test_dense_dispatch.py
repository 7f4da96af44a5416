"""The dense routed compute (research/deepseek3/dense_dispatch.py) against HF's DeepseekV3MoE and the block dispatch,
and the static rule that picks it on CPU."""
import numpy as np

from mindspore import Tensor

from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.dense_dispatch import dense_footprint, dense_is_leaner
from research.deepseek3.moe import DeepseekV3MoE, default_moe_dispatch, dispatch_footprint
from conftest import require_reference
from test_moe import (EXPERTS, GRAD_TOLERANCE, INTER, eager_and_graph, grads, hf_grads_by_name, hf_twin,
                      make_cfg, random_hidden, set_bias)


def dense_twin(cfg, **overrides):
    """A block-sparse MoE and a dense one with the same weights (one seeded init, copied by name)."""
    block = DeepseekV3MoE(make_cfg(**overrides), block_size=4)
    dense = DeepseekV3MoE(make_cfg(moe_dispatch="dense", **overrides))
    values = {name: param.asnumpy() for name, param in block.parameters_and_names()}
    for name, param in dense.parameters_and_names():
        param.set_data(Tensor(values[name]))
    assert block.dispatch == "block_sparse" and dense.dispatch == "dense"
    return block, dense


def test_output_and_gradients_match_hf_and_block_dispatch_with_idle_experts():
    torch = require_reference("torch")
    cfg = make_cfg()
    block, dense = dense_twin(cfg)
    bias = np.zeros(EXPERTS, np.float32)
    bias[[3, EXPERTS - 1]] = -10.0                                          # never chosen
    set_bias(block, bias)
    set_bias(dense, bias)
    x = random_hidden(21)
    out, load, _ = dense(Tensor(x))
    block_out, block_load, _ = block(Tensor(x))
    hf = hf_twin(dense, cfg)
    hf_out = hf(torch.tensor(x))
    assert np.abs(out.asnumpy() - hf_out.detach().numpy()).max() <= 1e-5
    assert np.abs(out.asnumpy() - block_out.asnumpy()).max() <= 1e-5
    np.testing.assert_array_equal(load.asnumpy(), block_load.asnumpy())
    assert load.asnumpy()[3] == 0 and load.asnumpy()[-1] == 0

    cotangent = np.random.RandomState(22).randn(*x.shape).astype(np.float32)
    ours = grads(dense, x, Tensor(cotangent))
    (hf_out * torch.tensor(cotangent)).sum().backward()
    expected = hf_grads_by_name(hf, cfg)
    for name, grad in expected.items():
        np.testing.assert_allclose(ours[name], grad, **GRAD_TOLERANCE, err_msg=name)
    for e in range(EXPERTS):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            grad = ours[f"experts.{e}.{proj}.weight"]
            assert (np.abs(grad).max() > 0) == (load.asnumpy()[e] > 0), (e, proj)   # exactly zero when idle


def test_graph_mode_equals_pynative_with_three_experts_per_token():
    _, dense = dense_twin(make_cfg(), num_experts_per_tok=3, n_group=2, topk_group=1, norm_topk_prob=False)
    (eager_out, eager_grads), (graph_out, graph_grads) = eager_and_graph(dense, Tensor(random_hidden(23)))
    np.testing.assert_allclose(graph_out, eager_out, atol=1e-5)
    assert len(graph_grads) == len(eager_grads) > 3 * EXPERTS
    for graph_grad, eager_grad in zip(graph_grads, eager_grads):
        np.testing.assert_allclose(graph_grad, eager_grad, **GRAD_TOLERANCE)


def test_rule_picks_dense_for_the_1b_recipe_and_blocks_for_the_benchmark_shape():
    """1B at seq 256: the block dispatch would copy 79 blocks of 3 x 2048 x 2048 expert weights (994 M elements)
    where the dense one keeps 16 x 256 x (4 x 2048 + 2048) = 42 M activation elements."""
    one_b = dict(seq_length=256, hidden_size=2048, n_routed_experts=16, num_experts_per_tok=8,
                 moe_intermediate_size=2048, n_group=8, topk_group=4)
    copies = dispatch_footprint(256, 8, 16, 2048, 2048)["weight_copy_elements"]
    assert copies == 79 * 3 * 2048 * 2048
    assert dense_footprint(256, 16, 2048, 2048)["kept_activation_elements"] == 16 * 256 * 5 * 2048
    assert dense_is_leaner(256, 8, 16, 2048, 2048, copies)
    assert default_moe_dispatch("CPU", DeepseekV3Config(**one_b)) == "dense"
    bench = dict(seq_length=512, hidden_size=256, n_routed_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=128, n_group=1, topk_group=1)
    assert default_moe_dispatch("CPU", DeepseekV3Config(**bench)) == "block_sparse"
    assert default_moe_dispatch("Ascend", DeepseekV3Config(**one_b)) == "grouped_matmul"
    assert DeepseekV3MoE(make_cfg(seq_length=64)).dispatch == "block_sparse"
    assert DeepseekV3MoE(make_cfg(seq_length=1, moe_intermediate_size=64 * INTER)).dispatch == "dense"  # no config key
