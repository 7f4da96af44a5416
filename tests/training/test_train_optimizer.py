"""AdamW (fp32 moments, bias correction, decoupled weight decay, updated in place by the fused kernel)
against PyTorch, against the previous implementation's formula, through a checkpoint; global-norm clipping."""
import numpy as np
import pytest

from conftest import require_reference

ms = pytest.importorskip("mindspore")

from mindpretrain.training import checkpoint as ckpt  # noqa: E402
from mindpretrain.training.optimizer import AdamW  # noqa: E402
from mindpretrain.training.train_step import clip_factor  # noqa: E402

SHAPES = {"w1": (4, 3), "w2": (2, 5), "norm": (5,)}
LRS = [1e-2, 5e-3, 2e-3, 1e-3]
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1


def _problem(seed=0, steps=len(LRS)):
    rng = np.random.RandomState(seed)
    initial = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    grads = [{name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
             for _ in range(steps)]
    return initial, grads


def _run_ours(initial, grads, lrs, dtype=None, optimizer=None, params=None, betas=BETAS, eps=EPS):
    params = params or [ms.Parameter(ms.Tensor(initial[name], dtype), name=name) for name in SHAPES]
    optimizer = optimizer or AdamW(params, betas=betas, eps=eps, weight_decay=WEIGHT_DECAY)
    for step_grads, lr in zip(grads, lrs):
        step_grads = tuple(ms.Tensor(step_grads[name]).astype(param.dtype) for name, param in zip(SHAPES, params))
        optimizer(ms.mutable(step_grads), ms.Tensor(lr, ms.float32))
    return params, optimizer


def _previous_formula(initial, grads, lrs, param_dtype=np.float32):
    """The previous implementation, in NumPy float32: decay, then the bias-corrected Adam step (the
    parameter rounded to its own dtype after each step)."""
    one = np.float32(1)
    beta1, beta2, eps, weight_decay = (np.float32(value) for value in (*BETAS, EPS, WEIGHT_DECAY))
    params = {name: value.copy() for name, value in initial.items()}
    avg = {name: np.zeros_like(value) for name, value in initial.items()}
    avg_sq = {name: np.zeros_like(value) for name, value in initial.items()}
    for step, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        lr = np.float32(lr)
        correction1, correction2 = one - beta1 ** np.float32(step), one - beta2 ** np.float32(step)
        for name, grad in step_grads.items():
            avg[name] = beta1 * avg[name] + (one - beta1) * grad
            avg_sq[name] = beta2 * avg_sq[name] + (one - beta2) * grad * grad
            if params[name].ndim >= 2:
                params[name] = params[name] - lr * weight_decay * params[name]
            denominator = np.sqrt(avg_sq[name] / correction2) + eps
            params[name] = params[name] - lr * (avg[name] / correction1) / denominator
            params[name] = params[name].astype(param_dtype).astype(np.float32)
    return params, avg, avg_sq


def _assert_relative(actual, expected, bound=1e-6, per_element=True):
    """Relative error per element, or (moments, which sums of random gradients bring near zero, where
    the rounding of the moving average shows) relative to the tensor's largest magnitude."""
    scale = np.abs(expected) if per_element else np.abs(expected).max()
    relative = np.abs(actual - expected) / np.maximum(scale, 1e-30)
    assert relative.max() <= bound, f"max relative error {relative.max():.3g} > {bound}"


@pytest.mark.parametrize("mode, betas, eps", [("GRAPH_MODE", BETAS, EPS), ("PYNATIVE_MODE", BETAS, EPS),
                                              ("GRAPH_MODE", (0.8, 0.99), 0.1)])
def test_adamw_matches_torch_over_several_steps(mode, betas, eps):
    """eps = 0.1 is comparable to sqrt(v_hat), so the folded epsilon is checked too."""
    torch = require_reference("torch")
    ms.set_context(mode=getattr(ms, mode))
    initial, grads = _problem()
    params, optimizer = _run_ours(initial, grads, LRS, betas=betas, eps=eps)

    reference = {name: torch.nn.Parameter(torch.tensor(initial[name])) for name in SHAPES}
    decayed = torch.optim.AdamW([reference["w1"], reference["w2"]], lr=LRS[0], betas=betas, eps=eps,
                                weight_decay=WEIGHT_DECAY)
    plain = torch.optim.AdamW([reference["norm"]], lr=LRS[0], betas=betas, eps=eps, weight_decay=0.0)
    for step_grads, lr in zip(grads, LRS):
        for name, param in reference.items():
            param.grad = torch.tensor(step_grads[name])
        for torch_optimizer in (decayed, plain):
            for group in torch_optimizer.param_groups:
                group["lr"] = lr
            torch_optimizer.step()
    for param, avg, avg_sq in zip(params, optimizer.exp_avg, optimizer.exp_avg_sq):
        state = (decayed if param.name != "norm" else plain).state[reference[param.name]]
        _assert_relative(param.asnumpy(), reference[param.name].detach().numpy())
        _assert_relative(avg.asnumpy(), state["exp_avg"].numpy(), per_element=False)
        _assert_relative(avg_sq.asnumpy(), state["exp_avg_sq"].numpy(), per_element=False)
    assert float(optimizer.adam_step.asnumpy()[0]) == 4.0
    assert all(moment.dtype == ms.float32 for moment in optimizer.exp_avg)


def test_adamw_matches_the_previous_implementation():
    ms.set_context(mode=ms.GRAPH_MODE)
    initial, grads = _problem(seed=3)
    params, optimizer = _run_ours(initial, grads, LRS)
    expected, avg, avg_sq = _previous_formula(initial, grads, LRS)
    for param, moment, moment_sq in zip(params, optimizer.exp_avg, optimizer.exp_avg_sq):
        _assert_relative(param.asnumpy(), expected[param.name])
        _assert_relative(moment.asnumpy(), avg[param.name], per_element=False)
        _assert_relative(moment_sq.asnumpy(), avg_sq[param.name], per_element=False)
    # the undecayed vector moved by the Adam step alone: decay would have shrunk it by lr * wd more
    assert not np.allclose(params[2].asnumpy(), initial["norm"] * (1 - LRS[0] * WEIGHT_DECAY), atol=1e-7)


def test_float16_parameters_take_the_same_formula_with_float32_moments():
    """The fused kernel needs one dtype for var and moments; other dtypes use the tensor formula."""
    ms.set_context(mode=ms.GRAPH_MODE)
    initial, grads = _problem(seed=5, steps=2)
    initial = {name: value.astype(np.float16).astype(np.float32) for name, value in initial.items()}
    grads = [{name: value.astype(np.float16).astype(np.float32) for name, value in step.items()} for step in grads]
    params, optimizer = _run_ours(initial, grads, LRS[:2], dtype=ms.float16)
    assert optimizer.in_place_flags == (False, False, False)
    expected, avg, _ = _previous_formula(initial, grads, LRS[:2], param_dtype=np.float16)
    for param, moment in zip(params, optimizer.exp_avg):
        assert param.dtype == ms.float16 and moment.dtype == ms.float32
        _assert_relative(moment.asnumpy(), avg[param.name], per_element=False)
        # equal up to one float16 rounding step (the update itself is ~1e-2)
        np.testing.assert_allclose(param.asnumpy().astype(np.float32), expected[param.name], rtol=1e-3)


def test_grad_scale_equals_scaling_the_gradients_first_to_the_bit():
    """`optimizer(grads, lr, clip)` (each gradient scaled just before its update) is what
    ApplyUpdateCell computes by scaling every gradient first."""
    from mindpretrain.training.train_step import ApplyUpdateCell

    ms.set_context(mode=ms.GRAPH_MODE)
    initial, grads = _problem(seed=11, steps=2)
    scaled = [{name: grad * np.float32(0.37) for name, grad in step.items()} for step in grads]
    reference, reference_optimizer = _run_ours(initial, scaled, LRS[:2])
    inside = [ms.Parameter(ms.Tensor(initial[name]), name=name) for name in SHAPES]
    inside_optimizer = AdamW(inside, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    first = [ms.Parameter(ms.Tensor(initial[name]), name=name) for name in SHAPES]
    apply_update = ApplyUpdateCell(AdamW(first, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY))
    for step_grads, lr in zip(grads, LRS[:2]):
        tensors = ms.mutable(tuple(ms.Tensor(step_grads[name]) for name in SHAPES))
        step = inside_optimizer(tensors, ms.Tensor(lr, ms.float32), ms.Tensor(0.37, ms.float32))
        apply_update(tensors, ms.Tensor(lr, ms.float32), ms.Tensor(0.37, ms.float32))
    assert float(step.asnumpy()[0]) == 2.0
    for ours, by_cell, expected in zip(inside, first, reference):
        np.testing.assert_array_equal(ours.asnumpy(), expected.asnumpy())
        np.testing.assert_array_equal(by_cell.asnumpy(), expected.asnumpy())
    for name, state in inside_optimizer.state_parameters().items():
        np.testing.assert_array_equal(state.asnumpy(), reference_optimizer.state_parameters()[name].asnumpy())


def test_state_round_trips_through_a_checkpoint_and_resumes_to_the_bit(tmp_path):
    ms.set_context(mode=ms.GRAPH_MODE)
    initial, grads = _problem(seed=7)
    straight, straight_optimizer = _run_ours(initial, grads, LRS)

    first, first_optimizer = _run_ours(initial, grads[:2], LRS[:2])
    directory = ckpt.save_checkpoint(str(tmp_path), 2, {param.name: param for param in first},
                                     first_optimizer.state_parameters(), {}, {})
    saved = ckpt.read_tensors(directory, ckpt.OPTIMIZER_FILE, ckpt.OPTIMIZER_PREFIX)
    assert sorted(saved) == sorted(["adam_step"] + [f"{kind}.{name}" for kind in ("exp_avg", "exp_avg_sq")
                                                    for name in SHAPES])
    weights = ckpt.read_tensors(directory, ckpt.MODEL_FILE)
    resumed = [ms.Parameter(ms.Tensor(np.zeros(shape, np.float32)), name=name) for name, shape in SHAPES.items()]
    for param in resumed:
        param.set_data(ms.Tensor(weights[param.name]))
    resumed_optimizer = AdamW(resumed, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    for name, param in resumed_optimizer.state_parameters().items():
        param.set_data(ms.Tensor(saved[name]))
    _run_ours(None, grads[2:], LRS[2:], optimizer=resumed_optimizer, params=resumed)
    for ours, reference in zip(resumed, straight):
        np.testing.assert_array_equal(ours.asnumpy(), reference.asnumpy())
    for name, state in resumed_optimizer.state_parameters().items():
        np.testing.assert_array_equal(state.asnumpy(), straight_optimizer.state_parameters()[name].asnumpy())


def test_clip_factor_matches_torch_clip_grad_norm():
    torch = require_reference("torch")
    rng = np.random.RandomState(1)
    grads = [torch.tensor(rng.normal(size=(3, 4)).astype(np.float32)) for _ in range(3)]
    params = [torch.nn.Parameter(torch.zeros(3, 4)) for _ in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=0.5))
    factor = clip_factor(norm, 0.5)
    for param, grad in zip(params, grads):
        np.testing.assert_allclose(param.grad.numpy(), grad.numpy() * factor, rtol=1e-6)
    assert clip_factor(0.1, 0.5) == 1.0 and clip_factor(10.0, None) == 1.0


@pytest.mark.parametrize("mode", ["GRAPH_MODE", "PYNATIVE_MODE"])
@pytest.mark.parametrize("threshold, host_flags", [(0, (True, True, True)), (10, (True, True, False))])
def test_cpu_parameters_take_the_host_update_and_still_match_torch(monkeypatch, mode, threshold, host_flags):
    """On CPU, float32 parameters of HOST_UPDATE_MIN_ELEMENTS or more (by default all) leave the compiled update
    and are updated in place on their host memory (host_adamw.py), through the trainer's `UpdateStep`: with every
    parameter on the host no cell is compiled; with the threshold raised, w1 (12 elements) and w2 (10) take the
    host update after the compiled cell updated the norm (5). A clipping scale on one step."""
    from mindpretrain.training import optimizer as optimizer_module
    from mindpretrain.training.train_step import UpdateStep

    torch = require_reference("torch")
    monkeypatch.setattr(optimizer_module, "HOST_UPDATE_MIN_ELEMENTS", threshold)
    ms.set_context(mode=getattr(ms, mode))
    try:
        initial, grads = _problem(seed=13, steps=3)
        params = [ms.Parameter(ms.Tensor(initial[name]), name=name) for name in SHAPES]
        optimizer = AdamW(params, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        assert optimizer.host_flags == (False,) * 3               # a bare AdamW cell updates everything itself
        update = UpdateStep(optimizer)
        assert optimizer.host_flags == host_flags and (update.cell is None) == all(host_flags)
        scales = (1.0, 0.37, 1.0)
        reference = {name: torch.nn.Parameter(torch.tensor(initial[name])) for name in SHAPES}
        decayed = torch.optim.AdamW([reference["w1"], reference["w2"]], lr=LRS[0], betas=BETAS, eps=EPS,
                                    weight_decay=WEIGHT_DECAY)
        plain = torch.optim.AdamW([reference["norm"]], lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=0.0)
        for step_grads, lr, scale in zip(grads, LRS, scales):
            update(tuple(ms.Tensor(step_grads[name]) for name in SHAPES), ms.Tensor(lr, ms.float32),
                   ms.Tensor(scale, ms.float32))
            for name, param in reference.items():
                param.grad = torch.tensor(step_grads[name] * np.float32(scale))
            for torch_optimizer in (decayed, plain):
                torch_optimizer.param_groups[0]["lr"] = lr
                torch_optimizer.step()
        assert float(optimizer.adam_step.asnumpy()[0]) == 3
        for param, avg, avg_sq in zip(params, optimizer.exp_avg, optimizer.exp_avg_sq):
            state = (decayed if param.name != "norm" else plain).state[reference[param.name]]
            _assert_relative(param.asnumpy(), reference[param.name].detach().numpy())
            _assert_relative(avg.asnumpy(), state["exp_avg"].numpy(), per_element=False)
            _assert_relative(avg_sq.asnumpy(), state["exp_avg_sq"].numpy(), per_element=False, bound=2e-6)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_host_step_extension_equals_its_numpy_fallback_to_the_bit():
    """The C++ step (threads over ranges) and the NumPy fallback (chunks) round identically, and both write in
    place."""
    from mindpretrain.training import host_adamw

    assert host_adamw._host_adamw is not None, "the C++ host AdamW extension is not built (pip install -e .)"
    rng = np.random.RandomState(5)
    size = 3 * (1 << 16) + 7                     # several threads' ranges and a ragged end
    state = [rng.normal(size=size).astype(np.float32), np.abs(rng.normal(size=size)).astype(np.float32) * 0.1,
             np.abs(rng.normal(size=size)).astype(np.float32) * 0.01]
    grad = rng.normal(size=size).astype(np.float32)
    scalars = (0.37, 0.9, 0.95, 1e-3, 1e-4, 0.271, 0.0975, 1e-8)
    results = []
    for use_extension, threads in ((True, 4), (True, 1), (False, 1)):
        arrays = [array.copy() for array in state]
        host_adamw.adamw_step(*arrays, grad, scalars, decay=True, threads=threads, use_extension=use_extension)
        results.append(arrays)
    for arrays in results[1:]:
        for left, right in zip(results[0], arrays):
            np.testing.assert_array_equal(left, right)
    assert not np.array_equal(results[0][0], state[0])
    with pytest.raises(ValueError, match="writable C-contiguous float32"):
        host_adamw.adamw_step(state[0][::2], state[1][::2], state[2][::2], grad[::2], scalars, True)


def test_an_update_over_many_parameters_compiles_with_the_default_call_depth():
    """The update chains its per-parameter steps; MindSpore's evaluator recurses along the chain, so 300
    parameters exceed the default max_call_depth (1000): the update cell raises it, and the result is still the
    formula's."""
    from mindpretrain.training.train_step import ApplyUpdateCell

    previous = ms.get_context("max_call_depth")
    ms.set_context(mode=ms.GRAPH_MODE, max_call_depth=1000)
    try:
        rng = np.random.RandomState(3)
        initial = {f"w{index}": rng.normal(size=(2, 2)).astype(np.float32) for index in range(300)}
        grads = {name: rng.normal(size=(2, 2)).astype(np.float32) for name in initial}
        params = [ms.Parameter(ms.Tensor(value), name=name) for name, value in initial.items()]
        update = ApplyUpdateCell(AdamW(params, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY))
        update(ms.mutable(tuple(ms.Tensor(grads[name]) for name in initial)), ms.Tensor(1e-2, ms.float32),
               ms.Tensor(1.0, ms.float32))
        assert ms.get_context("max_call_depth") == 6 * 300 + 500
        expected, _, _ = _previous_formula(initial, [grads], [1e-2])
        for param in params[::37]:
            _assert_relative(param.asnumpy(), expected[param.name])
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE, max_call_depth=previous)
