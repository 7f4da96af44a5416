"""MindFormers' `aux_loss_types: ["expert", ...]` balance loss, against a NumPy re-derivation of its code.

The reference below is written from mindspore-lab/mindformers at c253906a9eba (June 2025, the last tree with
research/deepseek3): `mindformers/modules/transformer/moe.py` TopkRouterV2.construct / `_expert_load_balancing`
/ `_normalize` (the MoEV2 path) and `mindformers/modules/transformer/moev3.py` MoEV3.construct /
`_expert_load_balancing` (the use_gmm path), which compute the same quantity:
  s = sigmoid(x W^T) in float32; s' = s / (sum_j s_j + 1e-9);
  tokens reshaped to (G, N, E), G = its data-parallel shards (one group of the whole micro batch per rank);
  idx = topk(s', K) (unbiased, no group limit) if balance_via_topk_bias else the routing's indices;
  P = mean_N s' [G, E]; F = mean_{K N} one_hot(idx) [G, E]; loss = alpha * E^2 * mean_{G, E}(P * F).
"""
import types

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor
from mindspore import nn

from mindpretrain.validation import ConfigError
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.moe import DeepseekV3MoE

HIDDEN, INTER, EXPERTS, TOP_K = 32, 16, 8, 2
BATCH, SEQ = 3, 8
ALPHA = 0.01
BIAS = np.linspace(0.3, -0.3, EXPERTS)        # large enough that the biased routing differs from the unbiased top-k


@pytest.fixture(autouse=True)
def _seeded():
    ms.set_seed(4321)


def make_cfg(**overrides):
    values = dict(hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=EXPERTS,
                  num_experts_per_tok=TOP_K, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                  n_shared_experts=1, initializer_range=0.2, compute_dtype="float32", param_init_type="float32",
                  seq_balance_loss_alpha=ALPHA, balance_loss_kind="mindformers_expert", balance_loss_token_groups=1,
                  topk_bias_update_rate=0.001)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def make_moe(cfg):
    moe = DeepseekV3MoE(cfg)
    moe.gate.e_score_correction_bias.set_data(Tensor(BIAS.astype(np.float32)))
    return moe


def hidden(seed=0):
    return np.random.RandomState(seed).randn(BATCH, SEQ, HIDDEN).astype(np.float32)


def scores_np(moe, x):
    """Sigmoid router scores [N, E] in float64 from the layer's gate weight."""
    logits = x.reshape(-1, HIDDEN).astype(np.float64) @ moe.gate.weight.asnumpy().T.astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logits))


def routing_np(scores, bias, n_group, topk_group):
    """DeepSeek-V3's routing selection (biased, group-limited): expert ids [N, K]."""
    choice = scores + bias
    groups = choice.reshape(len(scores), n_group, -1)
    kept = np.argsort(-np.sort(groups, -1)[..., -2:].sum(-1), -1)[:, :topk_group]
    mask = np.zeros((len(scores), n_group), bool)
    np.put_along_axis(mask, kept, True, -1)
    choice = np.where(np.repeat(mask, EXPERTS // n_group, -1), choice, -np.inf)
    return np.argsort(-choice, -1)[:, :TOP_K]


def mindformers_expert_loss(scores, indices, groups=1):
    """TopkRouterV2/MoEV3 `_expert_load_balancing`: alpha * E^2 * mean_{g,i} P_gi F_gi (module docstring)."""
    normalised = scores / (scores.sum(-1, keepdims=True) + 1e-9)
    p = normalised.reshape(groups, -1, EXPERTS).mean(1)
    mask = np.eye(EXPERTS)[indices.reshape(groups, -1)]                       # [G, N*K, E]
    f = mask.mean(1)
    return ALPHA * EXPERTS ** 2 * np.mean(p * f)


def unbiased_topk(scores):
    normalised = scores / (scores.sum(-1, keepdims=True) + 1e-9)
    return np.argsort(-normalised, -1)[:, :TOP_K]


def balance(moe, x, real_tokens=None):
    return float(moe(Tensor(x), None if real_tokens is None else Tensor(real_tokens))[2].asnumpy())


def test_expert_loss_is_per_micro_batch_from_an_unbiased_topk():
    moe = make_moe(make_cfg())
    x = hidden(1)
    scores = scores_np(moe, x)
    indices = unbiased_topk(scores)
    expected = mindformers_expert_loss(scores, indices)
    np.testing.assert_allclose(balance(moe, x), expected, rtol=1e-6, atol=0)
    per_sequence = mindformers_expert_loss(scores, indices, groups=BATCH)
    assert abs(per_sequence - expected) > 1e-3 * expected               # the input tells the two apart
    routed = routing_np(scores, BIAS, 4, 2)
    assert not np.array_equal(np.sort(routed, -1), np.sort(indices, -1))   # ... and the two top-k's
    assert abs(mindformers_expert_loss(scores, routed) - expected) > 1e-3 * expected


def test_token_groups_balance_each_shard_of_the_batch():
    moe = make_moe(make_cfg(balance_loss_token_groups=BATCH))
    x = hidden(2)
    scores = scores_np(moe, x)
    expected = mindformers_expert_loss(scores, unbiased_topk(scores), groups=BATCH)
    np.testing.assert_allclose(balance(moe, x), expected, rtol=1e-6, atol=0)
    assert abs(mindformers_expert_loss(scores, unbiased_topk(scores)) - expected) > 1e-3 * expected


def test_without_bias_balancing_f_counts_the_routing():
    """balance_via_topk_bias False (our rate 0): TopkRouterV2 takes F from the indices it routed with."""
    moe = make_moe(make_cfg(topk_bias_update_rate=0.0))
    x = hidden(3)
    scores = scores_np(moe, x)
    expected = mindformers_expert_loss(scores, routing_np(scores, BIAS, 4, 2))
    np.testing.assert_allclose(balance(moe, x), expected, rtol=1e-6, atol=0)


def test_packed_rows_leave_padding_out():
    """Padding after a packed row's last document: the loss of the micro batch without the padding."""
    moe = make_moe(make_cfg())
    x = hidden(4)
    real = np.ones((BATCH, SEQ), np.float32)
    real[0, 5:] = 0.0
    real[2, 3:] = 0.0
    scores = scores_np(moe, x)
    kept = real.reshape(-1) > 0
    expected = mindformers_expert_loss(scores[kept], unbiased_topk(scores[kept]))
    np.testing.assert_allclose(balance(moe, x, real), expected, rtol=1e-6, atol=0)
    assert abs(balance(moe, x) - expected) > 1e-3 * expected


def numpy_gate_gradient(moe, x, indices):
    """d loss / d gate.weight [E, H] by the chain rule through s' = s / (sum s + 1e-9) and the sigmoid."""
    tokens = x.reshape(-1, HIDDEN).astype(np.float64)
    scores = scores_np(moe, x)
    f = np.eye(EXPERTS)[indices.reshape(-1)].mean(0)                         # one group: [E]
    d_normalised = ALPHA * EXPERTS ** 2 / EXPERTS * f / len(tokens)          # d loss / d s'_ti, same for every t
    total = scores.sum(-1, keepdims=True) + 1e-9
    d_scores = d_normalised / total - (d_normalised * scores).sum(-1, keepdims=True) / total ** 2
    d_logits = d_scores * scores * (1.0 - scores)
    return d_logits.T @ tokens


def test_gate_gradient_matches_the_chain_rule():
    moe = make_moe(make_cfg())
    x = hidden(5)
    grad = ms.grad(lambda h: moe(h)[2], None, [moe.gate.weight])(Tensor(x))[0].asnumpy()
    expected = numpy_gate_gradient(moe, x, unbiased_topk(scores_np(moe, x)))
    assert np.abs(expected).max() > 1e-4
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def mindformers_config(**moe):
    moe_config = dict(expert_num=EXPERTS, num_experts_chosen=TOP_K, n_group=4, topk_group=2, shared_expert_num=1,
                      moe_intermediate_size=INTER, routed_scaling_factor=2.5, topk_bias_update_rate=0.001,
                      first_k_dense_replace=1)
    moe_config.update(moe)
    return DeepseekV3Config(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_heads=2,
                            kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                            vocab_size=96, seq_length=SEQ, compute_dtype="float32", initializer_range=0.2,
                            moe_config=moe_config)


def test_mindformers_yaml_selects_the_mindformers_loss_end_to_end():
    config = mindformers_config(aux_loss_types=["expert", "device", "comm"], aux_loss_factors=[ALPHA, 0.0, 0.0])
    assert (config.balance_loss_kind, config.seq_balance_loss_alpha) == ("mindformers_expert", ALPHA)
    moe = make_moe(config)
    x = hidden(6)
    scores = scores_np(moe, x)
    np.testing.assert_allclose(balance(moe, x), mindformers_expert_loss(scores, unbiased_topk(scores)), rtol=1e-6)
    assert DeepseekV3Config().balance_loss_kind == "sequence"                 # our YAMLs and HF configs
    assert mindformers_config().balance_loss_kind == "sequence"


def test_factors_without_types_are_dropped_as_in_mindformers():
    config = mindformers_config(aux_loss_factors=[ALPHA])
    assert config.seq_balance_loss_alpha == 0.0001 and config.balance_loss_kind == "sequence"   # untouched defaults
    assert "moe_config.aux_loss_factors" in config.no_effect_keys


@pytest.mark.parametrize("types_, factors, message", [
    (["expert", "device", "comm"], [0.001, 0.01, 0.0],
     r"moe_config\.aux_loss_factors \(\[0\.001, 0\.01, 0\.0\]\) gives the 'device' balance loss factor 0\.01"),
    (["expert", "comm"], [0.001, 0.5], r"'comm' balance loss factor 0\.5; .*expert-parallel ranks"),
])
def test_device_and_comm_factors_are_refused(types_, factors, message):
    with pytest.raises(ConfigError, match=message):
        mindformers_config(aux_loss_types=types_, aux_loss_factors=factors)


@pytest.mark.parametrize("overrides, message", [
    (dict(balance_loss_kind="batch"), r"balance_loss_kind \('batch'\) must be one of 'sequence'"),
    (dict(balance_loss_token_groups=0), r"balance_loss_token_groups \(0\) must be a positive integer"),
])
def test_balance_loss_fields_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DeepseekV3Config(**overrides)


def test_semi_auto_parallel_gives_the_moe_blocks_mindformers_token_groups():
    """Under semi-auto parallel the blocks see the global batch: one token group per dp shard (x mp with
    sequence parallel), set by the spec's prepare_parallel."""
    import types

    from research.deepseek3.spec import set_balance_token_groups

    class Block(DeepseekV3MoE):
        def __init__(self):          # no weights needed: only the attribute is set
            nn.Cell.__init__(self)
            self.balance_groups = 1

    class Holder(nn.Cell):
        def __init__(self):
            super().__init__()
            self.first, self.second = Block(), Block()

    holder = Holder()
    assert set_balance_token_groups(holder, types.SimpleNamespace(data_parallel=4, model_parallel=2,
                                                                  use_seq_parallel=False)) == 4
    assert holder.first.balance_groups == holder.second.balance_groups == 4
    assert set_balance_token_groups(holder, types.SimpleNamespace(data_parallel=4, model_parallel=2,
                                                                  use_seq_parallel=True)) == 8
