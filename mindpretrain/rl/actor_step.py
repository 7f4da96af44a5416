"""The GRPO actor's compiled pieces: per-token log-probs of a sequence, and the policy objective as a network.

Rows are `prompt + response` right-padded to one length L (one compiled shape for every step); `labels[t]` is
the token at t + 1 and `response_mask[t]` is 1 where that token is a response token (EOS included), so the
log-prob at t is the policy's probability of the response token it produced. Positions start at 0 with the
prompt's first token, as in the sampler (left-padded prompts keep per-row positions from 0).

`GRPOPolicyLoss` has the network interface the trainer's `ForwardBackwardCell` differentiates —
`(input_ids, labels, loss_mask, *columns) -> (loss, metric, metric, metrics vector, expert_load)` — so GRPO gets
the same data-parallel gradient reduction, accumulation over micro batches, norm and expert-parallel handling
as pretraining. The aggregation (`loss_agg_mode`) is linear in the per-token losses, so it arrives as a weight
per token (`aggregation_weights`, computed in NumPy over the whole mini-batch of every rank): the weighted sum
of a micro batch, averaged by the cell over micro batches and ranks, equals verl's `agg_loss` over the global
mini-batch (tests/rl/test_actor_step.py checks it against `mindpretrain.rl.algorithms.agg_loss`).
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops

from mindpretrain.rl.algorithms import (clipped_surrogate, entropy_from_logits, kl_penalty, masked_sum,
                                        token_log_probs)
from mindpretrain.validation import require


def aggregation_weights(response_mask, loss_agg_mode, global_tokens, global_sequences, scale=1.0,
                        loss_scale_factor=None):
    """Per-token weights [N, L] such that sum(weights * per_token_loss) over every rank's rows is verl's
    `agg_loss(per_token_loss, response_mask, loss_agg_mode)` of the global mini-batch, times `scale` (the
    micro-batch count x data-parallel size, which the train step's averaging divides out again).

    `global_tokens` / `global_sequences`: the mini-batch's response tokens and sequences with at least one
    response token, over all ranks. seq-mean-token-sum-norm divides by `loss_scale_factor` (verl's default:
    the response length dimension, here the rollout's max_response_length)."""
    mask = np.asarray(response_mask, np.float32)
    if loss_agg_mode == "token-mean":
        weights = mask / max(float(global_tokens), 1.0)
    elif loss_agg_mode == "token-sum":
        weights = mask.copy()
    else:
        tokens = mask.sum(-1, keepdims=True)
        per_sequence = 1.0 / (tokens + 1e-8) if loss_agg_mode == "seq-mean-token-mean" else 1.0
        weights = mask * per_sequence / max(float(global_sequences), 1.0)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            require(loss_scale_factor, "loss_scale_factor", loss_scale_factor, "must be set for "
                    "seq-mean-token-sum-norm (the response length)")
            weights = weights / float(loss_scale_factor)
    return (weights * float(scale)).astype(np.float32)


def sequence_logits(model, input_ids):
    """(float32 logits [B, L, V], expert load, balance loss) of the model's main head, through the plugin's RL
    forward when it has one (`logits_and_expert_load`), else the model called without labels (no load, 0)."""
    forward = getattr(model, "logits_and_expert_load", None)
    if forward is not None:
        return forward(input_ids)
    return model(input_ids), ops.zeros((0, 1), ms.float32), ops.zeros((), ms.float32)


class TokenLogProbCell(nn.Cell):
    """(input_ids [B, L], labels [B, L]) -> log_softmax(logits / temperature) at the labels [B, L] (no gradient):
    the reference model's and the old policy's log-probs of the sampled tokens."""

    def __init__(self, model, temperature=1.0):
        super().__init__(auto_prefix=False)
        self.model = model
        self.temperature = float(temperature)

    def construct(self, input_ids, labels):
        logits = self.model(input_ids)          # without labels: the main head's float32 logits
        return ops.stop_gradient(token_log_probs(logits, labels, self.temperature))


class GRPOPolicyLoss(nn.Cell):
    """verl's actor objective on one micro batch, as a network for `ForwardBackwardCell`:

    construct(input_ids, labels, response_mask, old_logp, ref_logp, advantages, agg_weights, mean_weights)
    (all [B, L]) -> (loss, pg_loss, kl_loss, [entropy, pg_clipfrac], expert_load), where
    loss = pg_loss + kl_coef * kl_loss - entropy_coeff * entropy (+ the MoE balance loss with
    `use_balance_loss`), each term the `agg_weights`-weighted sum
    (see `aggregation_weights`) and pg_clipfrac the `mean_weights`-weighted (token-mean) share of tokens whose
    clipped surrogate won. With `on_policy` (one update per rollout) the old log-probs are the current ones,
    detached, and the `old_logp` column is not read."""

    def __init__(self, model, actor_config, temperature=1.0, on_policy=False):
        super().__init__(auto_prefix=False)
        self.model = model
        self.temperature = float(temperature)
        self.on_policy = bool(on_policy)
        self.clip_low, self.clip_high = float(actor_config.clip_ratio_low), float(actor_config.clip_ratio_high)
        self.clip_c = None if actor_config.clip_ratio_c is None else float(actor_config.clip_ratio_c)
        self.use_kl = bool(actor_config.use_kl_loss)
        self.kl_coef = float(actor_config.kl_loss_coef) if self.use_kl else 0.0
        self.kl_kind = actor_config.kl_loss_type
        self.entropy_coeff = float(actor_config.entropy_coeff)
        self.use_balance_loss = bool(getattr(actor_config, "use_balance_loss", False))

    def construct(self, input_ids, labels, response_mask, old_logp, ref_logp, advantages, agg_weights,
                  mean_weights):
        logits, expert_load, balance = sequence_logits(self.model, input_ids)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logp = token_log_probs(logits, labels)
        entropy = entropy_from_logits(logits)
        if self.entropy_coeff == 0.0:
            entropy = ops.stop_gradient(entropy)
        old = ops.stop_gradient(logp) if self.on_policy else old_logp
        losses, clipped, _, _ = clipped_surrogate(logp, old, advantages, self.clip_low, self.clip_high, self.clip_c)
        pg_loss = masked_sum(losses, agg_weights)
        entropy_term = masked_sum(entropy, agg_weights)
        clip_fraction = ops.stop_gradient(masked_sum(ops.cast(clipped, ms.float32), mean_weights))
        loss = pg_loss - self.entropy_coeff * entropy_term
        kl_loss = ops.zeros_like(pg_loss)
        if self.use_kl:
            kl_loss = masked_sum(kl_penalty(logp, ref_logp, self.kl_kind), agg_weights)
            loss = loss + self.kl_coef * kl_loss
        if self.use_balance_loss:      # the model's own MoE balance loss, as in pretraining (off by default in RL)
            loss = loss + ops.cast(balance, loss.dtype)
        return loss, pg_loss, kl_loss, ops.stack((ops.stop_gradient(entropy_term), clip_fraction)), expert_load
