"""DeepSeekMoE block against HF transformers' DeepseekV3MoE and against numpy implementations of the formulas."""
import types

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from mindpretrain.validation import ConfigError
from research.deepseek3 import moe as moe_module
from research.deepseek3.layers import SwiGLU
from research.deepseek3.moe import (DeepseekV3MoE, default_block_size, default_moe_dispatch, dispatch_footprint,
                                    expert_bias_update, expert_sorted_layout, grouped_matmul_footprint,
                                    num_dispatch_blocks)
from conftest import require_reference

HIDDEN, INTER, EXPERTS = 32, 16, 8
BATCH, SEQ = 2, 12
GRAD_TOLERANCE = dict(rtol=1e-5, atol=1e-5)   # gradients reach ~15 in magnitude; float32 summation order differs


@pytest.fixture(autouse=True)
def _seeded():
    """Same initial weights every run, so a routing near-tie cannot make a test flaky."""
    ms.set_seed(1234)


def make_cfg(**overrides):
    values = dict(hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                  n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1,
                  initializer_range=0.2, compute_dtype="float32", param_init_type="float32",
                  seq_balance_loss_alpha=0.0)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def params_np(moe):
    return {name: param.asnumpy() for name, param in moe.parameters_and_names()}


def hf_twin(moe, cfg):
    """HF DeepseekV3MoE with our weights (HF stacks gate|up as experts.gate_up_proj [E, 2I, H])."""
    torch = require_reference("torch")
    transformers = require_reference("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as HFMoE

    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, n_shared_experts=cfg.n_shared_experts)
    hf = HFMoE(hf_cfg).float()
    p = params_np(moe)
    with torch.no_grad():
        hf.gate.weight.copy_(torch.tensor(p["gate.weight"]))
        hf.gate.e_score_correction_bias.copy_(torch.tensor(p["gate.e_score_correction_bias"]))
        for e in range(cfg.n_routed_experts):
            gate_up = np.concatenate([p[f"experts.{e}.gate_proj.weight"], p[f"experts.{e}.up_proj.weight"]])
            hf.experts.gate_up_proj[e].copy_(torch.tensor(gate_up))
            hf.experts.down_proj[e].copy_(torch.tensor(p[f"experts.{e}.down_proj.weight"]))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, proj).weight.copy_(torch.tensor(p[f"shared_experts.{proj}.weight"]))
    return hf


def numpy_route(x, p, cfg):
    """Independent numpy router: (scores [N,E], selected expert ids [N,K])."""
    scores = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ p["gate.weight"].T.astype(np.float64))))
    choice = scores + p["gate.e_score_correction_bias"]
    groups = choice.reshape(len(x), cfg.n_group, -1)
    group_score = np.sort(groups, axis=-1)[..., -2:].sum(-1)
    kept = np.argsort(-group_score, axis=-1)[:, :cfg.topk_group]
    mask = np.zeros_like(group_score, dtype=bool)
    np.put_along_axis(mask, kept, True, axis=-1)
    choice = np.where(np.repeat(mask, cfg.n_routed_experts // cfg.n_group, axis=-1), choice, -np.inf)
    return scores, np.argsort(-choice, axis=-1)[:, :cfg.num_experts_per_tok]


def random_hidden(seed=0):
    return np.random.RandomState(seed).randn(BATCH, SEQ, HIDDEN).astype(np.float32)


def set_bias(moe, bias):
    moe.gate.e_score_correction_bias.set_data(Tensor(np.asarray(bias, np.float32)))


@pytest.mark.parametrize("overrides, block_size", [
    ({}, None),                                              # group routing, norm_topk_prob, 1 shared expert
    ({"norm_topk_prob": False}, 4),                          # unnormalised weights, several blocks per expert
    ({"n_group": 1, "topk_group": 1, "n_shared_experts": 2}, 8),   # no group limit, 2 shared experts
    ({"num_experts_per_tok": 3, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.0}, 1),
])
def test_output_matches_hf(overrides, block_size):
    torch = require_reference("torch")
    cfg = make_cfg(**overrides)
    moe = DeepseekV3MoE(cfg, block_size=block_size)
    hf = hf_twin(moe, cfg)
    x = random_hidden(1)
    out, _, _ = moe(Tensor(x))
    expected = hf(torch.tensor(x)).detach().numpy()
    assert np.abs(out.asnumpy() - expected).max() <= 1e-5


def test_bias_changes_selection_and_still_matches_hf():
    torch = require_reference("torch")
    cfg = make_cfg()
    moe = DeepseekV3MoE(cfg)
    x = random_hidden(2)
    flat = x.reshape(-1, HIDDEN)
    _, unbiased_choice = numpy_route(flat, params_np(moe), cfg)
    bias = np.linspace(-0.3, 0.3, EXPERTS).astype(np.float32)
    set_bias(moe, bias)
    p = params_np(moe)
    scores, biased_choice = numpy_route(flat, p, cfg)
    assert any(set(a) != set(b) for a, b in zip(unbiased_choice, biased_choice)), "bias must change the selection"

    _, topk_idx, topk_weight = moe.gate(Tensor(flat))
    assert [set(row) for row in topk_idx.asnumpy()] == [set(row) for row in biased_choice]
    # weights come from the unbiased scores
    picked = np.take_along_axis(scores, topk_idx.asnumpy().astype(np.int64), axis=1)
    expected_weight = picked / (picked.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    np.testing.assert_allclose(topk_weight.asnumpy(), expected_weight, atol=1e-6)

    hf = hf_twin(moe, cfg)
    out, load, _ = moe(Tensor(x))
    assert np.abs(out.asnumpy() - hf(torch.tensor(x)).detach().numpy()).max() <= 1e-5
    np.testing.assert_array_equal(load.asnumpy(), np.bincount(biased_choice.ravel(), minlength=EXPERTS))


def test_load_counts_match_brute_force():
    cfg = make_cfg()
    moe = DeepseekV3MoE(cfg)
    x = random_hidden(3)
    _, choice = numpy_route(x.reshape(-1, HIDDEN), params_np(moe), cfg)
    brute = np.zeros(EXPERTS, np.float32)
    for row in choice:
        for expert in row:
            brute[expert] += 1
    _, load, _ = moe(Tensor(x))
    assert load.dtype == ms.float32 and load.shape == (EXPERTS,)
    np.testing.assert_array_equal(load.asnumpy(), brute)
    assert load.asnumpy().sum() == BATCH * SEQ * cfg.num_experts_per_tok


def test_static_block_bound_is_sufficient_and_sparse():
    """For any legal per-expert counts the padded segments fit the static block count, far below dense rows."""
    rng = np.random.RandomState(0)
    for tokens, top_k, experts in [(24, 2, 8), (2048, 2, 8), (4096, 8, 256), (7, 3, 4)]:
        block = default_block_size(tokens * top_k, experts)
        blocks = num_dispatch_blocks(tokens, top_k, experts, block)
        for _ in range(100 if tokens * experts < 100000 else 5):
            skewed = rng.rand(tokens, experts) ** rng.uniform(0.1, 10, experts)   # uneven expert popularity
            choice = np.argpartition(-skewed, top_k - 1, axis=1)[:, :top_k]
            counts = np.bincount(choice.ravel(), minlength=experts)
            assert np.sum(-(-counts // block)) <= blocks
        worst = np.zeros(experts, np.int64)
        worst[:top_k] = tokens                                    # every token on the same K experts
        assert np.sum(-(-worst // block)) <= blocks
        if tokens >= 1024:
            assert blocks * block < 0.5 * tokens * experts       # far from dense compute
        footprint = dispatch_footprint(tokens, top_k, experts, HIDDEN, INTER)
        assert footprint["expert_rows"] == blocks * block
        assert footprint["weight_copy_elements"] == blocks * 3 * HIDDEN * INTER


def grads(moe, x, cotangent):
    """Gradients of sum(out * cotangent) w.r.t. the trainable parameters, by name."""
    weights = moe.trainable_params()

    def loss_fn(hidden):
        out, _, _ = moe(hidden)
        return (out * cotangent).sum()

    _, values = ms.value_and_grad(loss_fn, None, weights)(Tensor(x))
    return {w.name: g.asnumpy() for w, g in zip(weights, values)}


def test_gradients_match_hf_and_skip_unselected_experts():
    torch = require_reference("torch")
    cfg = make_cfg()
    moe = DeepseekV3MoE(cfg, block_size=4)
    bias = np.zeros(EXPERTS, np.float32)
    bias[[5, EXPERTS - 1]] = -10.0        # never chosen; the last expert also owns the unused tail blocks
    set_bias(moe, bias)
    assert "gate.e_score_correction_bias" not in {w.name for w in moe.trainable_params()}

    x = random_hidden(4)
    cotangent = np.random.RandomState(5).randn(*x.shape).astype(np.float32)
    ours = grads(moe, x, Tensor(cotangent))
    _, load, _ = moe(Tensor(x))
    assert load.asnumpy()[5] == 0 and load.asnumpy()[-1] == 0

    hf = hf_twin(moe, cfg)
    (hf(torch.tensor(x)) * torch.tensor(cotangent)).sum().backward()
    np.testing.assert_allclose(ours["gate.weight"], hf.gate.weight.grad.numpy(), **GRAD_TOLERANCE)
    assert np.abs(ours["gate.weight"]).max() > 0
    for e in range(EXPERTS):
        gate_up = hf.experts.gate_up_proj.grad[e].numpy()
        np.testing.assert_allclose(ours[f"experts.{e}.gate_proj.weight"], gate_up[:INTER], **GRAD_TOLERANCE)
        np.testing.assert_allclose(ours[f"experts.{e}.up_proj.weight"], gate_up[INTER:], **GRAD_TOLERANCE)
        np.testing.assert_allclose(ours[f"experts.{e}.down_proj.weight"], hf.experts.down_proj.grad[e].numpy(),
                                   **GRAD_TOLERANCE)
        selected = load.asnumpy()[e] > 0
        for proj in ("gate_proj", "up_proj", "down_proj"):
            grad = ours[f"experts.{e}.{proj}.weight"]
            assert (np.abs(grad).max() > 0) == selected, (e, proj)   # exactly zero iff no token routed
    np.testing.assert_allclose(ours["shared_experts.down_proj.weight"],
                               hf.shared_experts.down_proj.weight.grad.numpy(), **GRAD_TOLERANCE)


def numpy_balance_loss(x, p, cfg):
    scores, choice = numpy_route(x.reshape(-1, HIDDEN), p, cfg)
    scores = scores.reshape(BATCH, SEQ, -1)
    choice = choice.reshape(BATCH, SEQ, -1)
    losses = []
    for b in range(BATCH):
        f = np.zeros(EXPERTS)
        for t in range(SEQ):
            for expert in choice[b, t]:
                f[expert] += EXPERTS / (cfg.num_experts_per_tok * SEQ)
        normalised = scores[b] / scores[b].sum(-1, keepdims=True)
        losses.append(cfg.seq_balance_loss_alpha * np.sum(f * normalised.mean(0)))
    return np.mean(losses)


def test_sequence_balance_loss_matches_formula_and_trains_gate():
    cfg = make_cfg(seq_balance_loss_alpha=0.01)
    moe = DeepseekV3MoE(cfg)
    set_bias(moe, np.linspace(0.1, -0.1, EXPERTS))
    x = random_hidden(6)
    _, _, loss = moe(Tensor(x))
    np.testing.assert_allclose(float(loss.asnumpy()), numpy_balance_loss(x, params_np(moe), cfg), rtol=1e-5)

    weights = [moe.gate.weight]
    grad = ms.grad(lambda h: moe(h)[2], None, weights)(Tensor(x))[0]
    assert np.abs(grad.asnumpy()).max() > 0

    disabled = DeepseekV3MoE(make_cfg(seq_balance_loss_alpha=0.0))
    assert float(disabled(Tensor(x))[2].asnumpy()) == 0.0


def test_expert_bias_update_rule():
    bias = np.array([0.0, 0.5, -0.5, 0.0], np.float32)
    load = np.array([10, 2, 4, 4], np.float32)                   # mean 5
    new = expert_bias_update(bias, load, 0.001)
    np.testing.assert_allclose(new, [-0.001, 0.501, -0.499, 0.001], atol=1e-7)
    assert new.dtype == np.float32 and bias[0] == 0.0            # pure: input untouched
    balanced = expert_bias_update(bias, np.full(4, 3.0), 0.001)
    np.testing.assert_array_equal(balanced, bias)
    per_layer = expert_bias_update(np.zeros((2, 4)), np.array([[1, 1, 1, 5], [4, 0, 0, 0]]), 0.1)
    np.testing.assert_allclose(per_layer, [[0.1, 0.1, 0.1, -0.1], [-0.1, 0.1, 0.1, 0.1]])


def test_swiglu_mlp_formula():
    cfg = make_cfg()
    mlp = SwiGLU(HIDDEN, INTER, cfg, "moe.shared_")                      # the shared experts' cell
    assert sorted(name for name, _ in mlp.parameters_and_names()) == ["down_proj.weight", "gate_proj.weight",
                                                                      "up_proj.weight"]
    p = params_np(mlp)
    assert p["gate_proj.weight"].shape == (INTER, HIDDEN) and p["down_proj.weight"].shape == (HIDDEN, INTER)
    assert 0.15 < p["up_proj.weight"].std() < 0.25                       # normal(0, initializer_range)
    x = random_hidden(7)
    gate = x @ p["gate_proj.weight"].T
    expected = (gate / (1 + np.exp(-gate)) * (x @ p["up_proj.weight"].T)) @ p["down_proj.weight"].T
    np.testing.assert_allclose(mlp(Tensor(x)).asnumpy(), expected, atol=1e-5)


class _MoEGrad(nn.Cell):
    """Forward + backward in one cell, the way the trainer's compiled train step differentiates the model."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe
        self.weights = ms.ParameterTuple(moe.trainable_params())
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, hidden):
        return self.grad(self._loss, self.weights)(hidden)

    def _loss(self, hidden):
        out, _, balance = self.moe(hidden)
        return (out * out).sum() + balance


def eager_and_graph(moe, x):
    """(out, grads) in PyNative, then the same in GRAPH mode, as NumPy."""
    results = []
    for mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):
        ms.set_context(mode=mode)
        try:
            results.append((moe(x)[0].asnumpy(), [g.asnumpy() for g in _MoEGrad(moe)(x)]))
        finally:
            ms.set_context(mode=ms.PYNATIVE_MODE)
    return results


def test_graph_mode_forward_and_backward_equal_pynative():
    cfg = make_cfg(seq_balance_loss_alpha=0.01)
    moe = DeepseekV3MoE(cfg, block_size=4)
    (eager_out, eager_grads), (graph_out, graph_grads) = eager_and_graph(moe, Tensor(random_hidden(8)))
    np.testing.assert_allclose(graph_out, eager_out, atol=1e-5)
    for graph_grad, eager_grad in zip(graph_grads, eager_grads):
        np.testing.assert_allclose(graph_grad, eager_grad, **GRAD_TOLERANCE)


def test_parameters_follow_weight_mapping_with_the_project_config():
    """Built from the project's DeepseekV3Config, names/shapes equal weight_mapping's entries for one MoE layer."""
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.weight_mapping import hf_parameter_shapes, non_trainable_names

    cfg = DeepseekV3Config(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=INTER,
                           num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=None,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                           n_routed_experts=EXPERTS, num_experts_per_tok=2, n_group=4, topk_group=2,
                           num_nextn_predict_layers=0, compute_dtype="float32")
    moe = DeepseekV3MoE(cfg)
    prefix = "model.layers.1.mlp."
    expected = {name[len(prefix):]: shape for name, shape in hf_parameter_shapes(cfg).items()
                if name.startswith(prefix)}
    assert {name: tuple(p.shape) for name, p in moe.parameters_and_names()} == expected
    frozen = {name for name, p in moe.parameters_and_names() if not p.requires_grad}
    assert {prefix + name for name in frozen} == {n for n in non_trainable_names(cfg) if n.startswith(prefix)}
    out, load, balance = moe(Tensor(random_hidden(9)))
    assert out.shape == (BATCH, SEQ, HIDDEN) and float(load.asnumpy().sum()) == BATCH * SEQ * 2
    assert float(balance.asnumpy()) > 0                       # default seq_balance_loss_alpha 1e-4 is on


# ----- grouped-matmul dispatch (Ascend kernel replaced by a reference on CPU) ----------------------------------------

def loop_grouped_matmul(x, weight, group_list):
    """Reference for Ascend's GroupedMatmul(split_item=3, group_type=0) as documented: group_list holds cumulative row
    ends, rows [group_list[g-1], group_list[g]) are multiplied by weight[g]. A masked per-group loop of plain
    matmuls, so it runs (and differentiates) on CPU in PyNative and GRAPH mode."""
    rows = ops.arange(0, x.shape[0], dtype=ms.int64).reshape(-1, 1)
    group_of_row = (rows >= group_list.reshape(1, -1)).astype(ms.int32).sum(1).reshape(-1, 1)
    out = ops.zeros((x.shape[0], weight.shape[2]), x.dtype)
    for group in range(weight.shape[0]):
        out = out + ops.where(group_of_row == group, ops.matmul(x, weight[group]), ops.zeros_like(out))
    return out


def grouped_twin(moe, cfg):
    """The same weights behind the grouped-matmul dispatch, with the reference kernel injected."""
    twin = DeepseekV3MoE(cfg, dispatch="grouped_matmul", grouped_matmul=loop_grouped_matmul)
    state = params_np(moe)
    assert set(state) == {name for name, _ in twin.parameters_and_names()}      # names unchanged by the dispatch
    for name, param in twin.parameters_and_names():
        param.set_data(Tensor(state[name]))
    return twin


def test_reference_grouped_matmul_reproduces_the_kernel_docs_example():
    """The worked example of mindspore.ops.grouped_matmul_v4's docstring (counts [1,2,1,2] = cumulative [1,3,4,6])."""
    x = Tensor(np.repeat(np.array([0, 1, 2, 2, 1, 1], np.float32)[:, None], 4, axis=1))
    weight = Tensor(np.arange(32, dtype=np.float32).reshape(4, 4, 2))
    out = loop_grouped_matmul(x, weight, Tensor(np.array([1, 3, 4, 6], np.int64)))
    np.testing.assert_array_equal(out.asnumpy(), [[0, 0], [44, 48], [88, 96], [152, 160], [108, 112], [108, 112]])


def test_expert_sorted_layout_is_a_stable_sort_with_guard_rows():
    tokens, top_k = 9, 2
    rng = np.random.RandomState(11)
    choice = np.stack([rng.choice([0, 1, 3, 4], top_k, replace=False) for _ in range(tokens)])  # experts 2, 5 idle
    choice[:4, 0] = 4                                                                          # a popular expert
    choice[:4, 1] = np.where(choice[:4, 1] == 4, 0, choice[:4, 1])
    flat = choice.ravel()
    selected = np.eye(6, dtype=np.int32)[flat]
    counts = np.bincount(flat, minlength=6).astype(np.int32)
    source, row_of, group_list = expert_sorted_layout(Tensor(selected), Tensor(counts), top_k)
    source, row_of, group_list = source.asnumpy(), row_of.asnumpy(), group_list.asnumpy()

    assert group_list.dtype == np.int64
    np.testing.assert_array_equal(group_list, np.cumsum(counts + 1))          # cumulative, one guard row each
    assert np.all(np.diff(group_list) > 0) and group_list[-1] == len(flat) + 6 == len(source)
    start = 0
    for expert, end in enumerate(group_list):
        tokens_of_expert = [a // top_k for a in range(len(flat)) if flat[a] == expert]   # in token order
        np.testing.assert_array_equal(source[start:end - 1], tokens_of_expert)
        assert source[end - 1] == tokens                                       # guard row reads the zero row
        start = end
    np.testing.assert_array_equal(source[row_of], np.arange(len(flat)) // top_k)   # row_of inverts the permutation
    assert len(set(row_of.tolist())) == len(flat)


@pytest.mark.parametrize("overrides", [
    {},                                                                     # group routing, 1 shared expert
    {"num_experts_per_tok": 3, "n_group": 2, "topk_group": 1, "norm_topk_prob": False},
])
def test_grouped_matmul_dispatch_matches_block_sparse_and_hf(overrides):
    torch = require_reference("torch")
    cfg = make_cfg(**overrides)
    block_sparse = DeepseekV3MoE(cfg, block_size=4)
    grouped = grouped_twin(block_sparse, cfg)
    assert block_sparse.dispatch == "block_sparse" and grouped.dispatch == "grouped_matmul"
    x = random_hidden(10)
    out, load, _ = grouped(Tensor(x))
    reference_out, reference_load, _ = block_sparse(Tensor(x))
    expected = hf_twin(block_sparse, cfg)(torch.tensor(x)).detach().numpy()
    assert np.abs(out.asnumpy() - expected).max() <= 1e-5
    assert np.abs(out.asnumpy() - reference_out.asnumpy()).max() <= 1e-5
    np.testing.assert_array_equal(load.asnumpy(), reference_load.asnumpy())


def test_grouped_matmul_gradients_match_hf_and_skip_unselected_experts():
    torch = require_reference("torch")
    cfg = make_cfg()
    block_sparse = DeepseekV3MoE(cfg, block_size=4)
    bias = np.zeros(EXPERTS, np.float32)
    bias[[2, EXPERTS - 1]] = -10.0                                          # idle experts: guard row only
    set_bias(block_sparse, bias)
    grouped = grouped_twin(block_sparse, cfg)
    x = random_hidden(12)
    cotangent = np.random.RandomState(13).randn(*x.shape).astype(np.float32)
    ours = grads(grouped, x, Tensor(cotangent))
    block_grads = grads(block_sparse, x, Tensor(cotangent))
    load = grouped(Tensor(x))[1].asnumpy()
    assert load[2] == 0 and load[-1] == 0

    hf = hf_twin(block_sparse, cfg)
    (hf(torch.tensor(x)) * torch.tensor(cotangent)).sum().backward()
    np.testing.assert_allclose(ours["gate.weight"], hf.gate.weight.grad.numpy(), **GRAD_TOLERANCE)
    for e in range(EXPERTS):
        gate_up = hf.experts.gate_up_proj.grad[e].numpy()
        np.testing.assert_allclose(ours[f"experts.{e}.gate_proj.weight"], gate_up[:INTER], **GRAD_TOLERANCE)
        np.testing.assert_allclose(ours[f"experts.{e}.up_proj.weight"], gate_up[INTER:], **GRAD_TOLERANCE)
        np.testing.assert_allclose(ours[f"experts.{e}.down_proj.weight"], hf.experts.down_proj.grad[e].numpy(),
                                   **GRAD_TOLERANCE)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            grad = ours[f"experts.{e}.{proj}.weight"]
            assert (np.abs(grad).max() > 0) == (load[e] > 0), (e, proj)   # exactly zero iff no token routed
    for name, grad in block_grads.items():
        np.testing.assert_allclose(ours[name], grad, **GRAD_TOLERANCE)


def hf_grads_by_name(hf, cfg):
    """HF's parameter gradients under our (HF checkpoint) parameter names."""
    named = {"gate.weight": hf.gate.weight.grad.numpy()}
    for e in range(cfg.n_routed_experts):
        gate_up = hf.experts.gate_up_proj.grad[e].numpy()
        named[f"experts.{e}.gate_proj.weight"] = gate_up[:cfg.moe_intermediate_size]
        named[f"experts.{e}.up_proj.weight"] = gate_up[cfg.moe_intermediate_size:]
        named[f"experts.{e}.down_proj.weight"] = hf.experts.down_proj.grad[e].numpy()
    for proj in ("gate_proj", "up_proj", "down_proj"):
        named[f"shared_experts.{proj}.weight"] = getattr(hf.shared_experts, proj).weight.grad.numpy()
    return named


def test_grouped_matmul_dispatch_in_graph_mode_equals_pynative_and_hf():
    """Compiled forward + backward (the trainer's GradOperation-in-a-Cell shape) of the grouped path."""
    torch = require_reference("torch")
    cfg = make_cfg()
    grouped = grouped_twin(DeepseekV3MoE(cfg), cfg)
    x = random_hidden(14)
    eager_out = grouped(Tensor(x))[0].asnumpy()
    eager_grads = [g.asnumpy() for g in _MoEGrad(grouped)(Tensor(x))]
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_out = grouped(Tensor(x))[0].asnumpy()
        graph_grads = [g.asnumpy() for g in _MoEGrad(grouped)(Tensor(x))]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    hf = hf_twin(grouped, cfg)
    hf_out = hf(torch.tensor(x))
    (hf_out * hf_out).sum().backward()                                     # _MoEGrad's loss (balance loss off)
    assert np.abs(graph_out - hf_out.detach().numpy()).max() <= 1e-5
    np.testing.assert_allclose(graph_out, eager_out, atol=1e-5)
    expected = hf_grads_by_name(hf, cfg)
    names = [name for name, w in grouped.parameters_and_names() if w.requires_grad]   # trainable_params order
    assert len(graph_grads) == len(eager_grads) == len(names) == len(expected)
    for name, graph_grad, eager_grad in zip(names, graph_grads, eager_grads):
        np.testing.assert_allclose(graph_grad, eager_grad, **GRAD_TOLERANCE, err_msg=name)
        np.testing.assert_allclose(graph_grad, expected[name], rtol=1e-5, atol=1e-4,  # loss sum(out^2): larger grads
                                   err_msg=name)


def test_dispatch_is_chosen_by_config_and_device():
    assert default_moe_dispatch("Ascend") == "grouped_matmul"
    assert default_moe_dispatch("CPU") == "block_sparse"
    assert ms.get_context("device_target") == "CPU"
    assert DeepseekV3MoE(make_cfg()).dispatch == "block_sparse"              # no moe_dispatch key: by device
    assert DeepseekV3MoE(make_cfg(moe_dispatch=None)).dispatch == "block_sparse"
    with pytest.raises(ConfigError, match="moe_dispatch"):                   # the kernel does not exist on CPU
        DeepseekV3MoE(make_cfg(moe_dispatch="grouped_matmul"))
    with pytest.raises(ConfigError, match="moe_dispatch"):
        DeepseekV3MoE(make_cfg(moe_dispatch="sparse"))
    injected = DeepseekV3MoE(make_cfg(moe_dispatch="grouped_matmul"), grouped_matmul=loop_grouped_matmul)
    assert injected.dispatch == "grouped_matmul" and injected.grouped_matmul is loop_grouped_matmul
    kernel = moe_module._ASCEND_GROUPED_MATMUL                               # single-tensor x/w/y, M-axis groups
    assert (kernel.name, kernel.split_item, kernel.group_type, kernel.transpose_a, kernel.transpose_b) == (
        "GroupedMatmul", 3, 0, False, False)


def test_grouped_matmul_footprint_at_671b_scale():
    """Per MoE layer without expert parallelism: the stacked weights are one copy of the layer's experts (5x less
    than the block-sparse per-block copies at E=256, K=8, 4096 tokens), and only E guard rows are added."""
    tokens, top_k, experts, hidden, inter = 4096, 8, 256, 7168, 2048
    grouped = grouped_matmul_footprint(tokens, top_k, experts, hidden, inter)
    blocks = dispatch_footprint(tokens, top_k, experts, hidden, inter)
    assert grouped["stacked_weight_elements"] == 3 * experts * hidden * inter == 11_274_289_152
    assert grouped["expert_rows"] == tokens * top_k + experts < blocks["expert_rows"]
    assert blocks["weight_copy_elements"] / grouped["stacked_weight_elements"] == blocks["blocks"] / experts > 4.9


def test_dispatch_is_validated_with_the_config():
    from mindpretrain.validation import ConfigError
    from research.deepseek3.deepseek3_config import DeepseekV3Config

    assert DeepseekV3Config(moe_dispatch="block_sparse").moe_dispatch == "block_sparse"
    assert "moe_dispatch" not in DeepseekV3Config().to_hf_dict()
    with pytest.raises(ConfigError, match=r"moe_dispatch \('sparse'\) must be one of 'block_sparse', 'grouped_matmul'"):
        DeepseekV3Config(moe_dispatch="sparse")
