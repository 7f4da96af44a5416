"""The GRPO actor step's pieces against independent computations: the per-token aggregation weights equal
verl-semantics `agg_loss` of the global mini-batch when split over ranks and micro batches; the training rows put
each response token's log-prob where the sampler reported it; the compiled objective equals the NumPy
`actor_loss` on the same logits."""
import numpy as np
import pytest

from mindpretrain.rl.algorithms import LOSS_AGG_MODES, actor_loss, agg_loss
from mindpretrain.rl.actor_step import aggregation_weights
from mindpretrain.rl.rollout import Sample, group_reward_std, training_rows

ms = pytest.importorskip("mindspore")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_weights_split_over_ranks_and_micro_batches_give_the_global_agg_loss(mode):
    rng = np.random.RandomState(3)
    losses = rng.standard_normal((8, 10)).astype(np.float32)
    mask = (rng.rand(8, 10) > 0.4).astype(np.float32)
    mask[5] = 0.0                                      # a sequence without response tokens
    expected = agg_loss(losses, mask, mode, loss_scale_factor=10 if mode == "seq-mean-token-sum-norm" else None)
    dp, micro = 2, 2
    tokens, sequences = mask.sum(), float((mask.sum(-1) > 0).sum())
    total = 0.0
    for rank_rows in np.split(np.arange(8), dp):         # each rank: 4 rows, 2 micro batches of 2
        weights = aggregation_weights(mask[rank_rows], mode, tokens, sequences, scale=dp * micro,
                                      loss_scale_factor=10)
        for part in np.split(np.arange(4), micro):
            total += float((weights[part] * losses[rank_rows][part]).sum())
    np.testing.assert_allclose(total / (dp * micro), expected, rtol=1e-5)


def test_training_rows_align_labels_mask_and_sampler_logprobs():
    sample = Sample(0, 0, [1, 5, 6], [7, 8, 2], [-0.5, -0.25, -0.125], "stop", "x")
    ids, labels, mask, logp = training_rows([sample], 8, pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 7, 8, 2, 0, 0]]
    assert labels.tolist() == [[5, 6, 7, 8, 2, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]         # positions predicting 7, 8 and EOS
    assert logp[0, 2:5].tolist() == [-0.5, -0.25, -0.125] and logp[0, [0, 1, 5]].sum() == 0
    with pytest.raises(ValueError, match="exceeds"):
        training_rows([sample], 5)


def test_group_reward_std_finds_the_groups_without_signal():
    stds = group_reward_std([1, 1, 1, 0, 1, 0, 0.5, 0.5], 2)
    assert np.allclose(stds, [0.0, np.std([1, 0], ddof=1), np.std([1, 0], ddof=1), 0.0])


class _ActorConfig:
    clip_ratio_low, clip_ratio_high, clip_ratio_c = 0.2, 0.28, 3.0
    use_kl_loss, kl_loss_coef, kl_loss_type = True, 0.05, "low_var_kl"
    entropy_coeff = 0.01


def test_policy_loss_cell_equals_numpy_actor_loss_on_the_same_logits():
    from mindpretrain.rl.actor_step import GRPOPolicyLoss
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    config = DeepseekV3Config(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                              num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                              n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12,
                              qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, seq_length=8,
                              num_nextn_predict_layers=0, initializer_range=0.5,
                              compute_dtype="float32")
    model = DeepseekV3ForCausalLM(config)
    rng = np.random.RandomState(1)
    ids = rng.randint(0, 32, (3, 8)).astype(np.int32)
    labels = rng.randint(0, 32, (3, 8)).astype(np.int32)
    mask = (rng.rand(3, 8) > 0.3).astype(np.float32)
    old = rng.uniform(-5, -1, (3, 8)).astype(np.float32)
    ref = rng.uniform(-5, -1, (3, 8)).astype(np.float32)
    adv = np.repeat(rng.standard_normal((3, 1)), 8, 1).astype(np.float32) * mask
    temperature = 0.7
    logits = model(ms.Tensor(ids)).asnumpy() / temperature
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    logp = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    expected = actor_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, "seq-mean-token-mean", entropy=entropy,
                          entropy_coeff=0.01, ref_logp=ref, kl_kind="low_var_kl", kl_coef=0.05)
    weights = aggregation_weights(mask, "seq-mean-token-mean", mask.sum(), (mask.sum(-1) > 0).sum())
    mean_weights = aggregation_weights(mask, "token-mean", mask.sum(), 3)
    cell = GRPOPolicyLoss(model, _ActorConfig, temperature=temperature)
    loss, pg_loss, kl_loss, extra, load = cell(*(ms.Tensor(a) for a in (ids, labels, mask, old, ref, adv, weights,
                                                                        mean_weights)))
    np.testing.assert_allclose([float(loss.asnumpy()), float(pg_loss.asnumpy()), float(kl_loss.asnumpy()),
                                float(extra.asnumpy()[0]), float(extra.asnumpy()[1])],
                               [expected[0], expected[1], expected[4], expected[3], expected[2]], rtol=2e-5,
                               atol=1e-6)
    assert load.shape == (1, 4)
    _ActorConfig.use_balance_loss = True            # the model's balance loss joins the objective, nothing else
    try:
        with_balance = GRPOPolicyLoss(model, _ActorConfig, temperature=temperature)(
            *(ms.Tensor(a) for a in (ids, labels, mask, old, ref, adv, weights, mean_weights)))
    finally:
        del _ActorConfig.use_balance_loss
    balance = float(model.logits_and_expert_load(ms.Tensor(ids))[2].asnumpy())
    assert balance > 0
    np.testing.assert_allclose(float(with_balance[0].asnumpy()), float(loss.asnumpy()) + balance, rtol=1e-6)
