"""GRPO numerics against verl 0.9.1's and TRL's own functions, on identical seeded float32 inputs.

References: verl's `compute_grpo_outcome_advantage` (and its vectorised twin), `kl_penalty`,
`compute_policy_loss_vanilla`, `agg_loss`, `logprobs_from_logits`, `entropy_from_logits`; TRL's
`GRPOTrainer._compute_loss` (called on a stand-in trainer object), `selective_log_softmax`,
`entropy_from_logits`, `nanstd`. Gradients are compared with torch autograd through those functions.

verl and TRL are installed without their dependencies (requirements-test-nodeps.txt). Importing them
pulls in modules that the compared functions never use (verl/__init__ -> ray, tensordict, orjson,
codetiming; trl.trainer -> pandas, datasets, pyarrow); while importing, those names resolve to inert
stand-ins (unless really installed), which are dropped from sys.modules again right after.
"""
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections import defaultdict

import numpy as np
import pytest

import mindspore as ms
from conftest import require_reference
from mindpretrain.rl import algorithms as rl
from mindpretrain.validation import ConfigError

TOL = dict(rtol=1e-6, atol=1e-6)
# MindSpore's CPU exp kernel is off by up to 3.8e-6 (relative, against float64, over [-3, 3]; NumPy's
# and torch's by 2e-7), log_softmax by 4e-6: where a value or gradient goes through exp nonlinearly
# (low_var_kl, entropy) the MindSpore comparison allows that kernel error (and float32 entropy's own
# rounding, see test_entropy_matches_verl_and_trl); everything else is compared to 1e-6.
EXP_TOL = dict(rtol=1e-5, atol=1e-5)
VERL_UNUSED_IMPORTS = ("ray", "tensordict", "orjson", "codetiming")
TRL_UNUSED_IMPORTS = ("pandas", "datasets", "pyarrow")
KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k2+", "k3+", "low_var_kl+")


class _Inert(type):
    """Any attribute, call, subscript or `X | Y` of a stand-in module gives another stand-in."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (), {})

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator
        return _Inert("result", (), {})

    def __getitem__(cls, item):
        return cls


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (), {})


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = {root for root in roots if importlib.util.find_spec(root) is None}

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def _inert_imports(roots):
    finder = _InertFinder(roots)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name in sys.modules if name.split(".")[0] in finder.roots]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def torch():
    return require_reference("torch")


@pytest.fixture(scope="module")
def verl(torch):
    with _inert_imports(VERL_UNUSED_IMPORTS):
        core = require_reference("verl.trainer.ppo.core_algos")
        functional = require_reference("verl.utils.torch_functional")
    omegaconf = require_reference("omegaconf")
    return types.SimpleNamespace(core=core, F=functional, config=omegaconf.OmegaConf.create)


@pytest.fixture(scope="module")
def trl(torch):
    with _inert_imports(TRL_UNUSED_IMPORTS):
        utils = require_reference("trl.trainer.utils")
        grpo = require_reference("trl.trainer.grpo_trainer")
    return types.SimpleNamespace(utils=utils, GRPOTrainer=grpo.GRPOTrainer)


# ---------------------------------------------------------------------------------------------------
# inputs


def policy_batch(seed=0, batch=8, length=9, empty_row=True):
    """logp/old/ref/advantages/mask with every regime: in-range and clipped ratios, ratio > 3 with a
    negative advantage (dual clip), a log-ratio past the ±20 clamp, ref - logp = 30 (KL clamps)."""
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.6, (batch, length)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.35, (batch, length))).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.3, (batch, length))).astype(np.float32)
    advantages = np.repeat(rng.normal(0.0, 1.0, (batch, 1)), length, axis=1).astype(np.float32)
    advantages[1] = -np.abs(advantages[1]) - 0.5
    old[1, :4] = logp[1, :4] - np.float32(1.6)  # ratio e^1.6 ≈ 5 > 3, negative advantage: dual clip
    old[2, 0] = logp[2, 0] - np.float32(25.0)  # log ratio 25: clamped to 20
    ref[3, 1] = logp[3, 1] + np.float32(30.0)  # ref - logp = 30: low_var_kl's ±20 and ±10 clamps
    ref[3, 2] = logp[3, 2] - np.float32(30.0)
    mask = rng.random((batch, length)) > 0.25
    mask[:, 0] = True
    if empty_row:
        mask[5] = False
    return dict(logp=logp, old=old, ref=ref, advantages=advantages, mask=mask)


def to_mindspore(arrays):
    return {key: ms.Tensor(value) for key, value in arrays.items()}


def numpy_of(value):
    return value.asnumpy() if isinstance(value, ms.Tensor) else np.asarray(value)


def verl_actor_config(verl, clip_ratio_c, clip_high=0.28, clip_low=0.2, **batch_info):
    return verl.config(dict(clip_ratio=clip_low, clip_ratio_low=clip_low, clip_ratio_high=clip_high,
                            clip_ratio_c=clip_ratio_c, global_batch_info=batch_info))


# ---------------------------------------------------------------------------------------------------
# advantages


def verl_grpo(verl, torch, scores, group_size, mask, norm_by_std, eps=1e-6):
    """verl's outcome advantage, with the score placed on each response's last token."""
    token_rewards = np.zeros(mask.shape, np.float32)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    token_rewards[np.arange(len(scores)), last] = scores
    index = np.repeat(np.arange(len(scores) // group_size), group_size).astype(object)
    outputs = []
    for estimator in (verl.core.compute_grpo_outcome_advantage, verl.core.compute_grpo_vectorized_outcome_advantage):
        advantages, _ = estimator(torch.tensor(token_rewards), torch.tensor(mask, dtype=torch.float32), index,
                                  epsilon=eps, norm_adv_by_std_in_grpo=norm_by_std)
        outputs.append(advantages.numpy())
    return outputs


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("group_size", [4, 1])
@pytest.mark.parametrize("backend", ["numpy", "mindspore"])
def test_grpo_advantages_match_verl(verl, torch, norm_by_std, group_size, backend):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 2, 16).astype(np.float32) + rng.normal(0, 0.1, 16).astype(np.float32)
    scores[4:8] = 1.0  # an all-equal group: std 0, advantage 0
    mask = policy_batch(1, batch=16)["mask"]
    mask[5] = True
    expected_loop, expected_vectorised = verl_grpo(verl, torch, scores, group_size, mask, norm_by_std)
    convert = ms.Tensor if backend == "mindspore" else np.asarray
    ours = rl.grpo_advantages(convert(scores), group_size, norm_by_std=norm_by_std, response_mask=convert(mask))
    np.testing.assert_allclose(numpy_of(ours), expected_loop, **TOL)
    np.testing.assert_allclose(numpy_of(ours), expected_vectorised, **TOL)
    if group_size == 4:
        assert np.all(numpy_of(ours)[4:8] == 0)
    per_sample = numpy_of(rl.grpo_advantages(convert(scores), group_size, norm_by_std=norm_by_std))
    np.testing.assert_allclose(per_sample, expected_loop[np.arange(16), np.argmax(mask, axis=1)], **TOL)


def test_grpo_advantages_of_token_level_rewards_sum_them_as_verl(verl, torch):
    rng = np.random.default_rng(2)
    mask = rng.random((8, 6)) > 0.3
    token_rewards = (rng.normal(0, 1, (8, 6)) * mask).astype(np.float32)
    index = np.repeat(np.arange(2), 4).astype(object)
    expected, _ = verl.core.compute_grpo_outcome_advantage(torch.tensor(token_rewards), torch.tensor(mask).float(),
                                                           index)
    np.testing.assert_allclose(rl.grpo_advantages(token_rewards, 4, response_mask=mask), expected.numpy(), **TOL)


def test_grpo_advantages_match_trl_group_scaling(trl, torch):
    """TRL's GRPOTrainer: (r - nanmean_g) / (nanstd_g + 1e-4), scale_rewards='group'."""
    rewards = np.random.default_rng(3).normal(0, 1, 12).astype(np.float32)
    grouped = torch.tensor(rewards).view(-1, 3)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(3)
    std = trl.utils.nanstd(grouped, dim=1).repeat_interleave(3)
    expected = (torch.tensor(rewards) - mean) / (std + 1e-4)
    np.testing.assert_allclose(rl.grpo_advantages(rewards, 3, eps=1e-4), expected.numpy(), **TOL)


def test_grpo_advantages_reject_bad_shapes():
    with pytest.raises(ConfigError, match="group_size"):
        rl.grpo_advantages(np.zeros(6, np.float32), 4)
    with pytest.raises(ConfigError, match="response_mask"):
        rl.grpo_advantages(np.zeros((4, 3), np.float32), 2)
    with pytest.raises(ConfigError, match="rewards"):
        rl.grpo_advantages(np.zeros((4, 3, 2), np.float32), 2)


# ---------------------------------------------------------------------------------------------------
# KL


def mindspore_grad(function, *arrays):
    """Gradient of the scalar function(*tensors) w.r.t. its first argument (PyNative autodiff)."""
    return ms.grad(function, grad_position=0)(*[ms.Tensor(array) for array in arrays]).asnumpy()


def torch_grad(torch, function, first, *rest):
    leaf = torch.tensor(first, requires_grad=True)
    function(leaf, *[torch.tensor(array) for array in rest]).backward()
    return leaf.grad.numpy()


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_matches_verl_values_and_gradients(verl, torch, kind):
    batch = policy_batch(4)
    expected = verl.core.kl_penalty(torch.tensor(batch["logp"]), torch.tensor(batch["ref"]), kind).numpy()
    np.testing.assert_allclose(rl.kl_penalty(batch["logp"], batch["ref"], kind), expected, **TOL)
    ms_tol = EXP_TOL if kind.rstrip("+") in ("k3", "low_var_kl") else TOL
    ours_ms = rl.kl_penalty(ms.Tensor(batch["logp"]), ms.Tensor(batch["ref"]), kind)
    np.testing.assert_allclose(ours_ms.asnumpy(), expected, **ms_tol)
    weights = np.random.default_rng(5).normal(0, 1, batch["logp"].shape).astype(np.float32)
    expected_grad = torch_grad(torch, lambda lp, ref, w: (verl.core.kl_penalty(lp, ref, kind) * w).sum(),
                               batch["logp"], batch["ref"], weights)
    ours_grad = mindspore_grad(lambda lp, ref, w: (rl.kl_penalty(lp, ref, kind) * w).sum(),
                               batch["logp"], batch["ref"], weights)
    np.testing.assert_allclose(ours_grad, expected_grad, **ms_tol)


def test_low_var_kl_clamps_like_verl():
    logp = np.zeros(3, np.float32)
    ref = np.array([30.0, -30.0, 0.5], np.float32)
    value = rl.kl_penalty(logp, ref, "low_var_kl")
    assert value[0] == 10.0  # x = 30 -> 20: exp(20) - 21, clamped to 10
    assert value[1] == 10.0  # x = -30 -> -20: e^-20 + 19, clamped to 10
    np.testing.assert_allclose(value[2], np.exp(0.5) - 1.5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["full", "k4", "kl++", ""])
def test_unknown_kl_kind_is_a_config_error(kind):
    with pytest.raises(ConfigError, match="kl_loss_type"):
        rl.kl_penalty(np.zeros(2, np.float32), np.zeros(2, np.float32), kind)


# ---------------------------------------------------------------------------------------------------
# policy loss and aggregation


def verl_policy_loss(verl, torch, logp, batch, mode, clip_ratio_c):
    config = verl_actor_config(verl, 1e30 if clip_ratio_c is None else clip_ratio_c)
    return verl.core.compute_policy_loss_vanilla(
        old_log_prob=torch.tensor(batch["old"]), log_prob=logp, advantages=torch.tensor(batch["advantages"]),
        response_mask=torch.tensor(batch["mask"]), loss_agg_mode=mode, config=config)


@pytest.mark.parametrize("clip_ratio_c", [3.0, None])
@pytest.mark.parametrize("mode", rl.LOSS_AGG_MODES)
def test_policy_loss_matches_verl_value_clipfrac_and_gradient(verl, torch, mode, clip_ratio_c):
    batch = policy_batch(6)
    logp = torch.tensor(batch["logp"], requires_grad=True)
    expected, metrics = verl_policy_loss(verl, torch, logp, batch, mode, clip_ratio_c)
    expected.backward()
    args = (batch["old"], batch["advantages"], batch["mask"], 0.2, 0.28, clip_ratio_c, mode)
    loss, clip_fraction = rl.policy_loss(batch["logp"], *args)
    np.testing.assert_allclose(loss, expected.item(), **TOL)
    np.testing.assert_allclose(clip_fraction, metrics["actor/pg_clipfrac"], **TOL)
    tensors = to_mindspore(batch)
    ms_args = (tensors["old"], tensors["advantages"], tensors["mask"], 0.2, 0.28, clip_ratio_c, mode)
    ms_loss, ms_clip_fraction = rl.policy_loss(tensors["logp"], *ms_args)
    np.testing.assert_allclose(ms_loss.asnumpy(), expected.item(), **TOL)
    np.testing.assert_allclose(ms_clip_fraction.asnumpy(), metrics["actor/pg_clipfrac"], **TOL)
    gradient = ms.grad(lambda lp: rl.policy_loss(lp, *ms_args)[0])(tensors["logp"]).asnumpy()
    np.testing.assert_allclose(gradient, logp.grad.numpy(), **TOL)
    if clip_ratio_c is not None:  # the dual-clipped tokens (ratio ≈ 5, A < 0) carry no gradient
        assert np.all(gradient[1, :4] == 0) and np.any(logp.grad.numpy()[1, 4:] != 0)


def test_dual_clip_matches_verl_lower_clip_fraction(verl, torch):
    batch = policy_batch(7)
    _, metrics = verl_policy_loss(verl, torch, torch.tensor(batch["logp"]), batch, "token-mean", 3.0)
    _, _, dual_clipped, _ = rl.clipped_surrogate(batch["logp"], batch["old"], batch["advantages"], 0.2, 0.28, 3.0)
    assert dual_clipped[1, :4].all()
    np.testing.assert_allclose(rl.masked_mean(dual_clipped.astype(np.float32), batch["mask"]),
                               metrics["actor/pg_clipfrac_lower"], **TOL)


def test_per_sample_advantages_broadcast_over_tokens():
    batch = policy_batch(8)
    per_token = rl.policy_loss(batch["logp"], batch["old"], batch["advantages"], batch["mask"], 0.2, 0.2)
    per_sample = rl.policy_loss(batch["logp"], batch["old"], batch["advantages"][:, 0], batch["mask"], 0.2, 0.2)
    np.testing.assert_array_equal(per_token, per_sample)


@pytest.mark.parametrize("mode", rl.LOSS_AGG_MODES)
def test_agg_loss_with_global_batch_info_matches_verl(verl, torch, mode):
    batch = policy_batch(9)
    info = dict(dp_size=2, batch_num_tokens=57, global_batch_size=13, loss_scale_factor=32)
    expected = verl.core.agg_loss(torch.tensor(batch["advantages"]), torch.tensor(batch["mask"]), mode, **info)
    np.testing.assert_allclose(rl.agg_loss(batch["advantages"], batch["mask"], mode, **info), expected.item(), **TOL)
    ours_ms = rl.agg_loss(ms.Tensor(batch["advantages"]), ms.Tensor(batch["mask"]), mode, **info)
    np.testing.assert_allclose(ours_ms.asnumpy(), expected.item(), **TOL)


def test_masked_nan_never_reaches_the_loss():
    batch = policy_batch(10)
    losses = np.where(batch["mask"], batch["advantages"], np.nan).astype(np.float32)
    for mode in rl.LOSS_AGG_MODES:
        assert np.isfinite(rl.agg_loss(losses, batch["mask"], mode)), mode


def test_loss_arguments_are_checked():
    batch = policy_batch(11)
    args = (batch["logp"], batch["old"], batch["advantages"], batch["mask"])
    with pytest.raises(ConfigError, match="loss_agg_mode"):
        rl.policy_loss(*args, 0.2, 0.2, loss_agg_mode="seq-sum")
    with pytest.raises(ConfigError, match="clip_ratio_c"):
        rl.policy_loss(*args, 0.2, 0.2, clip_ratio_c=1.0)
    with pytest.raises(ConfigError, match="clip_ratio_low"):
        rl.policy_loss(*args, 1.2, 0.2)
    with pytest.raises(ConfigError, match="batch_num_tokens"):
        rl.agg_loss(batch["logp"], batch["mask"], "token-mean", dp_size=2)
    with pytest.raises(ConfigError, match="global_batch_size"):
        rl.agg_loss(batch["logp"], batch["mask"], "seq-mean-token-mean", dp_size=2)


# ---------------------------------------------------------------------------------------------------
# the whole actor objective against TRL's GRPOTrainer._compute_loss


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


def trl_grpo_loss(torch, trl, batch, loss_type, beta, entropy, entropy_coef):
    """TRL's own loss code, on a stand-in trainer whose model 'outputs' are our log-probs."""
    logp = torch.tensor(batch["logp"], requires_grad=True)
    length = logp.shape[1]
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.tensor(entropy), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=length, aux_loss_enabled=False,
        _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        accelerator=_Accelerator(), _metrics=defaultdict(lambda: defaultdict(list)))
    mask = torch.tensor(batch["mask"].astype(np.int64))
    inputs = dict(prompt_ids=torch.zeros((len(mask), 1), dtype=torch.long), prompt_mask=torch.ones_like(mask[:, :1]),
                  completion_ids=torch.zeros_like(mask), completion_mask=mask,
                  advantages=torch.tensor(batch["advantages"][:, 0]), old_per_token_logps=torch.tensor(batch["old"]),
                  ref_per_token_logps=torch.tensor(batch["ref"]), num_items_in_batch=mask.sum())
    loss = trl.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.item(), logp.grad.numpy()


TRL_LOSS_TYPES = {  # TRL loss_type -> (our loss_agg_mode, loss_scale_factor, entropy_coef)
    "bnpo": ("token-mean", None, 0.01),  # TRL's entropy bonus is a token mean: comparable in this mode only
    "grpo": ("seq-mean-token-mean", None, 0.0),
    "dr_grpo": ("seq-mean-token-sum-norm", "T", 0.0),
}


@pytest.mark.parametrize("loss_type", sorted(TRL_LOSS_TYPES))
def test_actor_loss_matches_trl_grpo_trainer(torch, trl, loss_type):
    batch = policy_batch(12, empty_row=False)
    batch["ref"] = (batch["logp"] + np.random.default_rng(13).normal(0, 0.3, batch["logp"].shape)).astype(np.float32)
    batch["old"][2, 0] = batch["logp"][2, 0]  # TRL has no ±20 log-ratio clamp; stay inside it
    entropy = np.random.default_rng(14).uniform(0, 3, batch["logp"].shape).astype(np.float32)
    mode, scale, entropy_coef = TRL_LOSS_TYPES[loss_type]
    expected, expected_grad = trl_grpo_loss(torch, trl, batch, loss_type, 0.04, entropy, entropy_coef)
    tensors = to_mindspore(batch)
    batch_info = {} if scale is None else dict(loss_scale_factor=batch["logp"].shape[1])

    def objective(logp):
        return rl.actor_loss(logp, tensors["old"], tensors["advantages"][:, 0], tensors["mask"], 0.2, 0.28, None,
                             mode, entropy=ms.Tensor(entropy), entropy_coeff=entropy_coef, ref_logp=tensors["ref"],
                             kl_kind="k3", kl_coef=0.04, **batch_info)[0]

    np.testing.assert_allclose(objective(tensors["logp"]).asnumpy(), expected, **TOL)
    np.testing.assert_allclose(ms.grad(objective)(tensors["logp"]).asnumpy(), expected_grad, **TOL)


# ---------------------------------------------------------------------------------------------------
# log-probs and entropy


def logits_batch(seed=15):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (3, 5, 50)).astype(np.float32)
    tokens = rng.integers(0, 50, (3, 5))
    return logits, tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_match_verl_and_trl(verl, trl, torch, temperature):
    logits, tokens = logits_batch()
    expected_verl = verl.F.logprobs_from_logits(torch.tensor(logits) / temperature, torch.tensor(tokens)).numpy()
    expected_trl = trl.utils.selective_log_softmax(torch.tensor(logits), torch.tensor(tokens), temperature).numpy()
    np.testing.assert_allclose(expected_verl, expected_trl, **TOL)
    np.testing.assert_allclose(rl.token_log_probs(logits, tokens, temperature), expected_trl, **TOL)
    ours_ms = rl.token_log_probs(ms.Tensor(logits), ms.Tensor(tokens), temperature)
    np.testing.assert_allclose(ours_ms.asnumpy(), expected_trl, **TOL)
    weights = np.random.default_rng(16).normal(0, 1, tokens.shape).astype(np.float32)
    expected_grad = torch_grad(torch, lambda x, w: (trl.utils.selective_log_softmax(
        x, torch.tensor(tokens), temperature) * w).sum(), logits, weights)
    ours_grad = mindspore_grad(lambda x, w: (rl.token_log_probs(x, ms.Tensor(tokens), temperature) * w).sum(),
                               logits, weights)
    np.testing.assert_allclose(ours_grad, expected_grad, **TOL)
    with pytest.raises(ConfigError, match="temperature"):
        rl.token_log_probs(logits, tokens, 0.0)


def test_entropy_matches_verl_and_trl(verl, trl, torch):
    logits, _ = logits_batch(17)
    # In float64 the formulas must agree to 1e-6; in float32 verl's and TRL's own results differ from
    # the float64 value by up to 2e-6 here (entropy ≈ 1 as logsumexp ≈ 8 minus sum(p·x) ≈ 7), so the
    # float32 comparisons allow 1e-5.
    expected64 = verl.F.entropy_from_logits(torch.tensor(logits, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(rl.entropy_from_logits(logits.astype(np.float64)), expected64, **TOL)
    np.testing.assert_allclose(trl.utils.entropy_from_logits(torch.tensor(logits, dtype=torch.float64)).numpy(),
                               expected64, **TOL)
    expected = verl.F.entropy_from_logits(torch.tensor(logits)).numpy()
    np.testing.assert_allclose(rl.entropy_from_logits(logits), expected, **EXP_TOL)
    np.testing.assert_allclose(rl.entropy_from_logits(ms.Tensor(logits)).asnumpy(), expected, **EXP_TOL)
    weights = np.random.default_rng(18).normal(0, 1, expected.shape).astype(np.float32)
    expected_grad = torch_grad(torch, lambda x, w: (verl.F.entropy_from_logits(x) * w).sum(), logits, weights)
    ours_grad = mindspore_grad(lambda x, w: (rl.entropy_from_logits(x) * w).sum(), logits, weights)
    np.testing.assert_allclose(ours_grad, expected_grad, **EXP_TOL)


# ---------------------------------------------------------------------------------------------------
# GRAPH mode: the loss compiles inside a Cell with its gradient, as the GRPO train step will use it


class _GraphObjective(ms.nn.Cell):
    def __init__(self, logp, mode):
        super().__init__()
        self.logp = ms.Parameter(ms.Tensor(logp), name="logp")
        self.mode = mode

    def construct(self, old, advantages, mask, ref):
        loss, _, _, _, _ = rl.actor_loss(self.logp, old, advantages, mask, 0.2, 0.28, 3.0, self.mode,
                                         ref_logp=ref, kl_kind="low_var_kl", kl_coef=0.1)
        return loss


class _WithGradient(ms.nn.Cell):
    def __init__(self, network):
        super().__init__()
        self.network = network
        self.weights = ms.ParameterTuple(network.trainable_params())
        self.grad = ms.ops.GradOperation(get_by_list=True)

    def construct(self, *inputs):
        return self.network(*inputs), self.grad(self.network, self.weights)(*inputs)


@pytest.fixture
def graph_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


def test_actor_loss_compiles_in_graph_mode(verl, torch, graph_mode):
    batch = policy_batch(19)
    logp = torch.tensor(batch["logp"], requires_grad=True)
    pg_loss, _ = verl_policy_loss(verl, torch, logp, batch, "seq-mean-token-mean", 3.0)
    kl = verl.core.kl_penalty(logp, torch.tensor(batch["ref"]), "low_var_kl")
    expected = pg_loss + 0.1 * verl.core.agg_loss(kl, torch.tensor(batch["mask"]), "seq-mean-token-mean")
    expected.backward()
    tensors = to_mindspore(batch)
    loss, (gradient,) = _WithGradient(_GraphObjective(batch["logp"], "seq-mean-token-mean"))(
        tensors["old"], tensors["advantages"], tensors["mask"], tensors["ref"])
    np.testing.assert_allclose(loss.asnumpy(), expected.item(), **TOL)
    np.testing.assert_allclose(gradient.asnumpy(), logp.grad.numpy(), **TOL)


def test_bad_mode_is_a_config_error_in_graph_mode_too(graph_mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the failed compile writes rank_0/om/analyze_fail.ir into the working directory
    batch = to_mindspore(policy_batch(20))
    with pytest.raises(ConfigError, match="loss_agg_mode"):
        _GraphObjective(batch["logp"].asnumpy(), "token-median")(batch["old"], batch["advantages"], batch["mask"],
                                                                 batch["ref"])
