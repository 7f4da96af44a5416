"""Expert parallelism for real: 2 CPU workers under msrun, dp 2, experts split ep=2 vs replicated ep=1.

One launch runs this file as the worker script: both ranks build the same tiny 8-expert DeepSeek-V3 twice (ep=1:
all experts; ep=2: rank r holds experts [4r, 4r+4), initialised from the ep=1 weights) and take 3 SGD steps on
the same global batch, the second with the expert bias forcing every token onto rank 0's experts (rank 1's get
none). Each rank writes what it measured to a JSON file; the test compares. After step 2 the ep=2 weights are
gathered to full HF-named tensors and loaded into a fresh ep=1 model, whose step 3 must match.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2,
            num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=4, seq_length=8, compute_dtype="float32", initializer_range=0.2, num_nextn_predict_layers=0,
            n_shared_experts=1)
LR = 0.05
STEPS = 3
STARVED_STEP = 1            # 0-based: rank 1's experts receive no token at this step


def _batch(step, rank):
    rng = np.random.RandomState(100 + step)
    ids = rng.randint(0, 64, (2, 2, 8)).astype(np.int32)[rank:rank + 1]      # [A=1, B=1, S]: this rank's row
    labels = rng.randint(0, 64, (2, 2, 8)).astype(np.int32)[rank:rank + 1]
    return ids, labels, np.ones_like(ids, np.float32)


def _set_bias(model, starved):
    import mindspore as ms
    bias = np.zeros(8, np.float32)
    if starved:
        bias[:4] = 10.0
    for parameter in model.moe_layer_biases():
        parameter.set_data(ms.Tensor(bias))


def _step(cell, model, step, rank):
    import mindspore as ms
    _set_bias(model, step == STARVED_STEP)
    ids, labels, mask = (ms.Tensor(column) for column in _batch(step, rank))
    losses, load, norm, grads = cell(ids, labels, mask, ms.Tensor(0.0, ms.float32), ms.Tensor(1.0, ms.float32))
    named = {param.name: grad.asnumpy() for param, grad in zip(cell.weights, grads)}
    for param in cell.weights:
        param.set_data(ms.Tensor(param.asnumpy() - LR * named[param.name]))
    return float(losses.asnumpy()[0]), float(norm.asnumpy()), load.asnumpy(), named


def _cell(model, layout):
    from mindpretrain.parallel.expert_groups import expert_index
    from mindpretrain.training.train_step import ForwardBackwardCell
    weights = model.trainable_params()
    flags = [layout is not None and expert_index(param.name) is not None for param in weights]
    return ForwardBackwardCell(model, weights, dp_size=2, local_weights=flags)


def _copy_weights(target, source_arrays):
    import mindspore as ms
    for param in target.get_parameters():
        param.set_data(ms.Tensor(np.ascontiguousarray(source_arrays[param.name])))


def worker(out_dir):
    import mindspore as ms
    from mindspore.communication import get_rank, init
    ms.set_context(mode=0)
    ms.set_device("CPU")
    init()
    rank = get_rank()
    from mindpretrain.parallel.expert_groups import ExpertLayout, gather_full_tensors
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
    from research.deepseek3.expert_parallel import local_expert_bytes

    ms.set_seed(7)
    full = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))
    initial = {param.name: param.asnumpy() for param in full.get_parameters()}
    layout = ExpertLayout(8, expert_parallel=2, data_parallel=2, rank=rank)
    config = DeepseekV3Config(**TINY)
    config.expert_layout = layout
    split = DeepseekV3ForCausalLM(config)
    _copy_weights(split, initial)
    report = {"bytes": [local_expert_bytes(full), local_expert_bytes(split)],
              "names": sorted(name for name, _ in split.parameters_and_names() if ".experts." in name)}
    full_cell, split_cell = _cell(full, None), _cell(split, layout)
    for step in range(STEPS):
        if step == STEPS - 1:          # "checkpoint" at ep=2, "resume" at ep=1
            gathered = gather_full_tensors({p.name: p for p in split.get_parameters()}, layout)
            resumed = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))
            _copy_weights(resumed, gathered)
            report["gathered_exact"] = all(np.array_equal(gathered[p.name], p.asnumpy())
                                           for p in split.get_parameters())
            report["resumed"] = _step(_cell(resumed, None), resumed, step, rank)[0]
        one, two = _step(full_cell, full, step, rank), _step(split_cell, split, step, rank)
        report.setdefault("steps", []).append({
            "loss": [one[0], two[0]], "norm": [one[1], two[1]], "load": [one[2].tolist(), two[2].tolist()],
            "grad_diff": max(float(np.max(np.abs(one[3][name] - grad))) for name, grad in two[3].items())})
    Path(out_dir, f"rank_{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    worker(sys.argv[1])


pytest.importorskip("mindspore")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    from msrun_helpers import MsrunJob
    out = tmp_path_factory.mktemp("ep")
    with MsrunJob(f"{Path(__file__)} {out}", 2, out / "msrun_log") as job:
        assert job.wait(600) == 0, job.report()
    return [json.loads((out / f"rank_{rank}.json").read_text()) for rank in (0, 1)]


def test_ep2_matches_ep1_losses_and_gradients_including_a_starved_rank(reports):
    for report in reports:
        for step in report["steps"]:
            np.testing.assert_allclose(step["loss"][1], step["loss"][0], rtol=1e-5)
            np.testing.assert_allclose(step["norm"][1], step["norm"][0], rtol=1e-5)
            np.testing.assert_allclose(step["load"][1], step["load"][0])
            assert step["grad_diff"] <= 1e-5
        starved = np.asarray(report["steps"][STARVED_STEP]["load"][1])
        assert starved[:, 4:].sum() == 0 and starved[:, :4].sum() > 0     # rank 1's experts got no token
    assert reports[0]["steps"][0]["loss"] != reports[0]["steps"][1]["loss"]


def test_expert_bytes_per_rank_halve_and_names_stay_global(reports):
    for rank, report in enumerate(reports):
        assert report["bytes"][1] * 2 == report["bytes"][0] > 0
        indices = {int(name.split(".experts.")[1].split(".")[0]) for name in report["names"]}
        assert indices == set(range(4 * rank, 4 * rank + 4))


def test_ep2_state_gathered_and_resumed_at_ep1_gives_the_same_loss(reports):
    for report in reports:
        assert report["gathered_exact"]
        np.testing.assert_allclose(report["resumed"], report["steps"][-1]["loss"][1], rtol=1e-6)
