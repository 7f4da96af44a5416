"""Reinforcement learning for language models (GRPO): the algorithms' numerics and reward grading.

`mindpretrain.rl.algorithms` holds the advantage, KL and policy-loss functions (NumPy or MindSpore),
`mindpretrain.rl.rewards` the answer graders and the `RewardRunner` that scores a batch under a
time limit. The names below are loaded on first use, so that the grader's worker process, which
imports this package, does not pay for importing MindSpore.
"""
import importlib

_EXPORTS = {
    "grpo_advantages": "algorithms", "kl_penalty": "algorithms", "policy_loss": "algorithms",
    "clipped_surrogate": "algorithms", "actor_loss": "algorithms", "agg_loss": "algorithms",
    "masked_sum": "algorithms", "masked_mean": "algorithms", "token_log_probs": "algorithms",
    "entropy_from_logits": "algorithms",
    "RewardRunner": "rewards", "RewardBatch": "rewards", "RewardError": "rewards",
    "math_reward": "rewards", "resolve_grader": "rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
