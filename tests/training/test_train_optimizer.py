"""AdamW (fp32 moments, bias correction, decoupled weight decay) and global-norm clipping against PyTorch."""
import numpy as np
import pytest

from conftest import require_reference

ms = pytest.importorskip("mindspore")

from mindpretrain.training.optimizer import AdamW  # noqa: E402
from mindpretrain.training.train_step import clip_factor  # noqa: E402


def test_adamw_matches_torch_over_several_steps():
    torch = require_reference("torch")
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.RandomState(0)
    shapes = {"w1": (4, 3), "w2": (2, 5), "norm": (5,)}
    initial = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    grads = [{name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(4)]
    lrs = [1e-2, 5e-3, 2e-3, 1e-3]

    params = [ms.Parameter(ms.Tensor(initial[name]), name=name) for name in shapes]
    optimizer = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step_grads, lr in zip(grads, lrs):
        optimizer(ms.mutable(tuple(ms.Tensor(step_grads[name]) for name in shapes)), ms.Tensor(lr, ms.float32))

    reference = {name: torch.nn.Parameter(torch.tensor(initial[name])) for name in shapes}
    decayed = torch.optim.AdamW([reference["w1"], reference["w2"]], lr=lrs[0], betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.1)
    plain = torch.optim.AdamW([reference["norm"]], lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step_grads, lr in zip(grads, lrs):
        for name, param in reference.items():
            param.grad = torch.tensor(step_grads[name])
        for torch_optimizer in (decayed, plain):
            for group in torch_optimizer.param_groups:
                group["lr"] = lr
            torch_optimizer.step()
    for param in params:
        np.testing.assert_allclose(param.asnumpy(), reference[param.name].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert float(optimizer.adam_step.asnumpy()[0]) == 4.0
    assert all(moment.dtype == ms.float32 for moment in optimizer.exp_avg)


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
