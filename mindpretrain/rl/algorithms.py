"""GRPO's numerics: group advantages, KL estimators, the clipped policy loss and its aggregation.

The semantics are verl 0.9.1's (`verl/trainer/ppo/core_algos.py`: `compute_grpo_outcome_advantage`,
`kl_penalty`, `compute_policy_loss_vanilla`, `agg_loss`; `verl/utils/torch_functional.py`:
`masked_sum`, `masked_mean`, `entropy_from_logits`), which slime's eps-clip-high / dual-clip loss and
TRL's GRPOTrainer share where they overlap; tests/rl/test_algorithms.py compares against verl's and
TRL's own functions. Where verl multiplies by the mask, masked positions are first replaced by zero
(as verl's `masked_sum` already does), so a NaN or inf under the mask never reaches the loss.

Every function takes NumPy arrays or MindSpore tensors: one implementation written against a small
array namespace (`_NumpyOps` / `_MindSporeOps`, picked from the first argument). The loss functions
are differentiable with MindSpore and compile in GRAPH mode, so the GRPO train step calls them inside
a Cell. Argument checks are `constexpr` functions: MindSpore's graph compiler cannot raise the
project's ConfigError itself, but runs a constexpr in Python at compile time, so a bad
`loss_agg_mode` raises the same ConfigError in NumPy, PyNative and GRAPH mode.
"""
import numpy as np
import mindspore as ms
from mindspore import ops
from mindspore.ops import constexpr

from mindpretrain.validation import require

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm")
# verl's names for the KL estimators (http://joschu.net/blog/kl-approx.html) and what each computes;
# a trailing "+" (e.g. "k3+") keeps the value but takes k2's unbiased gradient (straight-through).
KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios to ±20 before exp, for stability
LOW_VAR_KL_CLAMP = 10.0  # and the low_var_kl estimate to ±10


class _NumpyOps:
    """The array operations the algorithms need, on NumPy arrays."""

    exp = staticmethod(np.exp)
    abs = staticmethod(np.abs)
    sqrt = staticmethod(np.sqrt)
    square = staticmethod(np.square)
    where = staticmethod(np.where)

    @staticmethod
    def asarray(x):
        return np.asarray(x)

    @staticmethod
    def clip(x, low, high):
        return np.clip(x, low, high)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def reshape(x, shape):
        return np.reshape(x, shape)

    @staticmethod
    def expand_last(x):
        return x[..., None]

    @staticmethod
    def cast_like(x, like):
        return np.asarray(x).astype(like.dtype)

    @staticmethod
    def to_bool(x):
        return np.asarray(x).astype(bool)

    @staticmethod
    def zeros_like(x):
        return np.zeros_like(x)

    @staticmethod
    def stop_gradient(x):
        return x

    @staticmethod
    def logsumexp(x):
        peak = np.max(x, axis=-1, keepdims=True)
        return (peak + np.log(np.sum(np.exp(x - peak), axis=-1, keepdims=True)))[..., 0]

    @staticmethod
    def softmax(x):
        shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return shifted / np.sum(shifted, axis=-1, keepdims=True)

    @staticmethod
    def take_last(x, index):
        return np.take_along_axis(x, np.asarray(index)[..., None].astype(np.int64), axis=-1)[..., 0]


class _MindSporeOps:
    """The same operations on MindSpore tensors (differentiable, GRAPH-mode compilable)."""

    @staticmethod
    def asarray(x):
        if isinstance(x, np.ndarray):
            return ms.Tensor(x)
        return x

    @staticmethod
    def exp(x):
        return ops.exp(x)

    @staticmethod
    def abs(x):
        return ops.abs(x)

    @staticmethod
    def sqrt(x):
        return ops.sqrt(x)

    @staticmethod
    def square(x):
        return ops.square(x)

    @staticmethod
    def where(condition, x, y):
        return ops.where(condition, x, y)

    @staticmethod
    def clip(x, low, high):
        return ops.clamp(x, low, high)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return ops.sum(x, axis, keepdims)

    @staticmethod
    def reshape(x, shape):
        return ops.reshape(x, shape)

    @staticmethod
    def expand_last(x):
        return ops.expand_dims(x, -1)

    @staticmethod
    def cast_like(x, like):
        return ops.cast(x, like.dtype)

    @staticmethod
    def to_bool(x):
        return ops.cast(x, ms.bool_)

    @staticmethod
    def zeros_like(x):
        return ops.zeros_like(x)

    @staticmethod
    def stop_gradient(x):
        return ops.stop_gradient(x)

    @staticmethod
    def logsumexp(x):
        return ops.logsumexp(x, -1)

    @staticmethod
    def softmax(x):
        return ops.softmax(x, -1)

    @staticmethod
    def take_last(x, index):
        return ops.squeeze(ops.gather_elements(x, -1, ops.expand_dims(ops.cast(index, ms.int32), -1)), -1)


_NUMPY = _NumpyOps()
_MINDSPORE = _MindSporeOps()


def _ops_for(x):
    """NumPy operations for NumPy input, MindSpore operations for MindSpore tensors."""
    if isinstance(x, np.ndarray):
        return _NUMPY
    return _MINDSPORE


@constexpr
def _check_agg_mode(loss_agg_mode, dp_size, tokens_given, sequences_given):
    require(loss_agg_mode in LOSS_AGG_MODES, "loss_agg_mode", loss_agg_mode, f"must be one of {list(LOSS_AGG_MODES)}")
    require(isinstance(dp_size, int) and dp_size >= 1, "dp_size", dp_size, "must be an integer >= 1")
    if dp_size > 1 and loss_agg_mode == "token-mean":
        require(tokens_given, "batch_num_tokens", None,
                "is required with dp_size > 1 (the global batch's valid-token count; token-mean)")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean"):
        require(sequences_given, "global_batch_size", None,
                f"is required with dp_size > 1 ({loss_agg_mode})")


@constexpr
def _check_clip(clip_ratio_low, clip_ratio_high, clip_ratio_c):
    require(0 <= clip_ratio_low < 1, "clip_ratio_low", clip_ratio_low,
            "must be in [0, 1) (the ratio's floor is 1 - clip_ratio_low)")
    require(clip_ratio_high >= 0, "clip_ratio_high", clip_ratio_high, "must be >= 0 (the ratio's ceiling is 1 + clip_ratio_high)")
    if clip_ratio_c is not None:
        require(clip_ratio_c > 1.0, "clip_ratio_c", clip_ratio_c,
                "must be > 1 (dual-clip PPO's bound on the ratio for negative advantages); None disables dual clip")


@constexpr
def _kl_estimator(kind):
    """(estimator, straight_through) for one of verl's KL names."""
    require(kind != "full", "kl_loss_type", kind,
            "needs whole-vocabulary log-probs, which verl does not implement either; use low_var_kl, k1 or k2")
    base = kind[:-1] if isinstance(kind, str) and kind.endswith("+") else kind
    require(base in KL_KINDS, "kl_loss_type", kind,
            f"must be one of {sorted(KL_KINDS)}, optionally with a '+' suffix (straight-through k2 gradient)")
    return KL_KINDS[base], kind.endswith("+")


@constexpr
def _check_temperature(temperature):
    require(temperature > 0, "temperature", temperature, "must be > 0")


@constexpr
def _check_advantage_args(shape, group_size, eps, has_mask):
    require(len(shape) in (1, 2), "rewards", shape, "must have shape [B] (per sample) or [B, T] (per token)")
    require(isinstance(group_size, int) and group_size >= 1, "group_size", group_size, "must be an integer >= 1")
    require(shape[0] % group_size == 0, "group_size", group_size,
            f"must divide the batch size {shape[0]} (each prompt's {group_size} responses are contiguous)")
    require(eps >= 0, "eps", eps, "must be >= 0")
    require(len(shape) == 1 or has_mask, "response_mask", None,
            "is required for per-token rewards [B, T] (the advantage is broadcast over the response tokens)")


def masked_sum(values, mask, axis=None):
    """Sum of `values` where `mask` is set (verl's masked_sum: masked NaNs do not leak in)."""
    xp = _ops_for(values)
    mask = xp.asarray(mask)
    kept = xp.where(xp.to_bool(mask), values, xp.zeros_like(values))
    return xp.sum(kept * xp.cast_like(mask, values), axis)


def masked_mean(values, mask, axis=None):
    """Mean of `values` where `mask` is set; 1e-8 in the denominator as verl (0 for an empty mask)."""
    xp = _ops_for(values)
    mask = xp.cast_like(xp.asarray(mask), values)
    return xp.cast_like(masked_sum(values, mask, axis) / (xp.sum(mask, axis) + 1e-8), values)


def agg_loss(loss_mat, loss_mask, loss_agg_mode="token-mean", dp_size=1, batch_num_tokens=None,
             global_batch_size=None, loss_scale_factor=None):
    """A [B, T] per-token loss to one scalar, as verl's `agg_loss`.

    token-mean: over all valid tokens; token-sum: their sum; seq-mean-token-mean: mean of each
    sequence's token mean; seq-mean-token-sum: mean of each sequence's token sum;
    seq-mean-token-sum-norm: that divided by `loss_scale_factor` (default T, Dr.GRPO). Fully masked
    sequences are left out of the seq-mean. Under data parallelism pass the global `batch_num_tokens`
    / `global_batch_size` with `dp_size` so the averaged gradient equals the global-batch loss's.
    """
    _check_agg_mode(loss_agg_mode, dp_size, batch_num_tokens is not None, global_batch_size is not None)
    xp = _ops_for(loss_mat)
    mask = xp.cast_like(xp.asarray(loss_mask), loss_mat)
    if loss_agg_mode == "token-mean":
        tokens = xp.sum(mask) if batch_num_tokens is None else batch_num_tokens
        loss = masked_sum(loss_mat, mask) / tokens * dp_size
    elif loss_agg_mode == "token-sum":
        loss = masked_sum(loss_mat, mask) * dp_size
    else:
        loss = _sequence_mean(xp, loss_mat, mask, loss_agg_mode, global_batch_size, dp_size)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return xp.cast_like(loss, loss_mat)  # NumPy 1.x promotes float32 scalars with Python floats to float64


def _sequence_mean(xp, loss_mat, mask, loss_agg_mode, global_batch_size, dp_size):
    """The seq-mean modes' mean over sequences that have at least one valid token."""
    token_counts = xp.sum(mask, -1)
    sequence_losses = masked_sum(loss_mat, mask, -1)
    if loss_agg_mode == "seq-mean-token-mean":
        sequence_losses = sequence_losses / (token_counts + 1e-8)
    has_tokens = xp.cast_like(token_counts > 0, loss_mat)
    sequences = xp.sum(has_tokens) if global_batch_size is None else global_batch_size
    return masked_sum(sequence_losses, has_tokens) / sequences * dp_size


def grpo_advantages(rewards, group_size, norm_by_std=True, eps=1e-6, response_mask=None):
    """GRPO's outcome advantage: each reward minus its group's mean, over the group's std + eps.

    `rewards` is [B] (one score per response) or [B, T] (token-level, summed per response as verl
    does); each prompt's `group_size` responses are contiguous. The std is unbiased (torch.std); a
    one-response group gets mean 0 and std 1 (verl's rule); `norm_by_std=False` is Dr.GRPO (no
    division). With `response_mask` the result is [B, T], the advantage on every response token.
    """
    xp = _ops_for(rewards)
    _check_advantage_args(rewards.shape, group_size, eps, response_mask is not None)
    scores = rewards if rewards.ndim == 1 else xp.sum(rewards, -1)
    grouped = xp.reshape(scores, (-1, group_size))
    if group_size == 1:
        centred, std = grouped, 1.0
    else:
        mean = xp.sum(grouped, 1, True) / group_size
        centred = grouped - mean
        std = xp.sqrt(xp.sum(xp.square(centred), 1, True) / (group_size - 1))
    advantages = xp.reshape(centred / (std + eps) if norm_by_std else centred, (-1,))
    if response_mask is None:
        return advantages
    return xp.expand_last(advantages) * xp.cast_like(xp.asarray(response_mask), advantages)


def kl_penalty(logp, ref_logp, kind="low_var_kl"):
    """Per-token KL estimate between the policy and the reference, under verl's names.

    k1/kl: logp - ref; abs: |logp - ref|; k2/mse: (logp - ref)^2 / 2; k3/low_var_kl:
    exp(x) - x - 1 with x = ref - logp clamped to ±20 and the result to ±10. "k3+" etc. keep the
    value but back-propagate k2's gradient. It is a loss term (see `actor_loss`), not a reward.
    """
    estimator, straight_through = _kl_estimator(kind)
    xp = _ops_for(logp)
    ref_logp = xp.asarray(ref_logp)
    if estimator == "k1":
        value = logp - ref_logp
    elif estimator == "abs":
        value = xp.abs(logp - ref_logp)
    elif estimator == "k2":
        value = 0.5 * xp.square(logp - ref_logp)
    else:
        log_ratio = xp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        value = xp.clip(xp.exp(log_ratio) - log_ratio - 1, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    if not straight_through:
        return value
    k2 = 0.5 * xp.square(logp - ref_logp)
    return k2 - xp.stop_gradient(k2) + xp.stop_gradient(value)


def clipped_surrogate(logp, old_logp, advantages, clip_ratio_low, clip_ratio_high, clip_ratio_c=None):
    """Per-token PPO-clip loss with eps-clip-high and optional dual clip (verl, slime).

    ratio = exp(clamp(logp - old_logp, ±20)); loss = max(-A·ratio, -A·clip(ratio, 1 - low, 1 + high));
    for A < 0 it is further capped at -A·clip_ratio_c (dual clip) when `clip_ratio_c` is set.
    Returns (losses, clipped, dual_clipped, log_ratio); `clipped` marks tokens where the clipped term
    won (verl's pg_clipfrac numerator), `dual_clipped` where the dual-clip cap did (pg_clipfrac_lower).
    `advantages` is [B, T] or [B] (then the same for every token of a response).
    """
    _check_clip(clip_ratio_low, clip_ratio_high, clip_ratio_c)
    xp = _ops_for(logp)
    old_logp = xp.asarray(old_logp)
    advantages = xp.asarray(advantages)
    if advantages.ndim == 1:
        advantages = xp.expand_last(advantages)
    log_ratio = xp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = xp.exp(log_ratio)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * xp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped = clipped_loss > unclipped_loss
    # `where`, not `maximum`: one branch gets the gradient (on ties both branches' gradients agree).
    losses = xp.where(clipped, clipped_loss, unclipped_loss)
    if clip_ratio_c is None:
        return losses, clipped, xp.zeros_like(losses) > 0, log_ratio
    dual_clip_loss = -advantages * clip_ratio_c
    dual_clipped = (losses > dual_clip_loss) & (advantages < 0)
    return xp.where(dual_clipped, dual_clip_loss, losses), clipped, dual_clipped, log_ratio


def policy_loss(logp, old_logp, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c=None,
                loss_agg_mode="token-mean", **batch_info):
    """GRPO/PPO policy loss, aggregated: (loss, clip_fraction), as verl's compute_policy_loss_vanilla.

    clip_fraction is verl's pg_clipfrac: the masked mean of tokens where the clipped term won (no
    gradient). `batch_info` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) goes to
    `agg_loss`.
    """
    xp = _ops_for(logp)
    losses, clipped, _, _ = clipped_surrogate(logp, old_logp, advantages, clip_ratio_low, clip_ratio_high,
                                              clip_ratio_c)
    loss = agg_loss(losses, response_mask, loss_agg_mode, **batch_info)
    clip_fraction = masked_mean(xp.cast_like(clipped, losses), response_mask)
    return loss, xp.stop_gradient(clip_fraction)


def actor_loss(logp, old_logp, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c=None,
               loss_agg_mode="token-mean", entropy=None, entropy_coeff=0.0, ref_logp=None, kl_kind="low_var_kl",
               kl_coef=0.0, **batch_info):
    """verl's actor objective: policy loss - entropy_coeff * entropy term + kl_coef * KL term.

    The entropy term (per-token `entropy`, from `entropy_from_logits`) and the KL term (per-token
    `kl_penalty(logp, ref_logp, kl_kind)`) are aggregated like the policy loss. Returns
    (loss, pg_loss, clip_fraction, entropy_loss, kl_loss); an absent term is 0.
    """
    xp = _ops_for(logp)
    pg_loss, clip_fraction = policy_loss(logp, old_logp, advantages, response_mask, clip_ratio_low,
                                         clip_ratio_high, clip_ratio_c, loss_agg_mode, **batch_info)
    loss = pg_loss
    entropy_loss = xp.zeros_like(pg_loss)
    kl_loss = xp.zeros_like(pg_loss)
    if entropy is not None:
        entropy_loss = agg_loss(xp.asarray(entropy), response_mask, loss_agg_mode, **batch_info)
        loss = loss - entropy_coeff * entropy_loss
    if ref_logp is not None:
        kl_loss = agg_loss(kl_penalty(logp, ref_logp, kl_kind), response_mask, loss_agg_mode, **batch_info)
        loss = loss + kl_coef * kl_loss
    return loss, pg_loss, clip_fraction, entropy_loss, kl_loss


def token_log_probs(logits, tokens, temperature=1.0):
    """log_softmax(logits / temperature) at `tokens`: the trainer's log-probs of sampled tokens.

    The temperature is the sampler's, so these match the rollout's log-probs; top-k/top-p are not
    applied (verl and TRL do not either). logits [..., V], tokens [...] -> [...].
    """
    _check_temperature(temperature)
    xp = _ops_for(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return xp.take_last(logits, tokens) - xp.logsumexp(logits)


def entropy_from_logits(logits):
    """Per-position entropy of softmax(logits): logsumexp(logits) - sum(softmax(logits) * logits)."""
    xp = _ops_for(logits)
    return xp.logsumexp(logits) - xp.sum(xp.softmax(logits) * logits, -1)
