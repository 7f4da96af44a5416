"""The planner's memory model against the real model on CPU.

1. Weights and optimizer state: the planner's bytes for the tiny config equal the bytes of the
   parameters of a really built `DeepseekV3ForCausalLM` (times the AdamW factor for trainable ones).
2. Activations: a subprocess builds a small model with the MindSpore CPU build, runs one
   forward + backward at a given sequence length and reports the peak RSS above its baseline
   (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the step). That delta
   holds the activations kept for backward, the backward's temporaries and the freshly allocated
   gradients; the planner's estimate of the same (reference kernels, no pipeline) must be within 20%, at
   two sequence lengths whose mix of S-linear and S^2 terms differs. The planner's reference-kernel
   constants were measured on one- and two-layer probes; this model (3 layers + MTP, two heads) was not
   used to set them.

Run this file directly (`python tests/test_plan_memory.py BATCH SEQ [SEQ ...]`) to print measurements, or
with `--calibrate` to re-fit the reference-kernel constants of `cost_model.py` on the calibration models
(one dense layer; dense + MoE) after the model's ops change.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small enough to run in seconds on 2 cores, with activations (not weights or logits) dominating.
PROBE_MODEL = dict(vocab_size=2048, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
                   q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                   max_position_embeddings=4096, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                   moe_intermediate_size=32, first_k_dense_replace=1, n_group=2, topk_group=1,
                   num_nextn_predict_layers=1, compute_dtype="float32", param_init_type="float32",
                   layernorm_compute_type="float32", softmax_compute_type="float32")
BATCH = 2
SEQ_LENGTHS = (512, 1024)
TOLERANCE = 0.20


def _status_kib(field):
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(seq_lengths, batch):
    """Forward+backward at each length (ascending) in this process; peak RSS above the pre-step baseline.

    One process serves all lengths: MindSpore's CPU memory pool keeps what a step freed, so the RSS
    high-water mark after the longer step, minus the baseline taken before the first measured step, is
    the memory the longer step needs (checked against separate processes: 264/772 MiB vs 261/768 MiB).
    """
    import gc

    import numpy as np
    import mindspore as ms

    sys.path.insert(0, str(ROOT))
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)
    cfg = DeepseekV3Config(**PROBE_MODEL, seq_length=max(seq_lengths))
    model = DeepseekV3ForCausalLM(cfg)
    params = model.trainable_params()

    def loss_fn(ids, labels, mask):
        return model(ids, labels, mask)[0]

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    rng = np.random.RandomState(0)

    def step(length):
        ids = ms.Tensor(rng.randint(0, cfg.vocab_size, (batch, length)).astype(np.int32))
        labels = ms.Tensor(rng.randint(0, cfg.vocab_size, (batch, length)).astype(np.int32))
        loss, grads = grad_fn(ids, labels, ms.Tensor(np.ones((batch, length), np.float32)))
        float(loss.asnumpy())
        return grads

    step(16)                              # kernels, pools and caches of the first step
    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    result = {"baseline": baseline, "gradient_bytes": sum(int(np.prod(p.shape)) * 4 for p in params)}
    for length in sorted(seq_lengths):
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")               # VmHWM := current RSS
        grads = step(length)
        result[str(length)] = _status_kib("VmHWM") * 1024 - baseline
        del grads
        gc.collect()
    return result


def _run_probe(seq_lengths, batch):
    env = dict(os.environ, GLOG_v="3")
    result = subprocess.run([sys.executable, __file__, str(batch)] + [str(seq) for seq in seq_lengths],
                            cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _estimate(seq_length, batch, overrides=None):
    from mindpretrain.parallel.parallel_config import ParallelConfig
    from mindpretrain.planning.cost_model import TrainingSetup, build_plan
    from research.deepseek3.deepseek3_config import DeepseekV3Config

    cfg = DeepseekV3Config(**{**PROBE_MODEL, **(overrides or {})}, seq_length=seq_length)
    plan = build_plan(cfg, ParallelConfig(), TrainingSetup(micro_batch_size=batch, seq_length=seq_length,
                                                           fused_kernels=False))
    stage = plan.stages[0]
    return stage.activations, stage.gradients


@pytest.fixture(scope="module")
def measurements():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-RSS reset needs Linux /proc/self/clear_refs")
    result = _run_probe(SEQ_LENGTHS, BATCH)
    return {seq: {"delta": result[str(seq)], "gradient_bytes": result["gradient_bytes"]} for seq in SEQ_LENGTHS}


@pytest.mark.parametrize("seq_length", SEQ_LENGTHS)
def test_activation_estimate_within_20_percent_of_measured_peak(measurements, seq_length):
    measured = measurements[seq_length]
    activations, gradients = _estimate(seq_length, BATCH)
    assert gradients == pytest.approx(measured["gradient_bytes"])
    estimate = activations + gradients
    error = (estimate - measured["delta"]) / measured["delta"]
    print(f"seq {seq_length}: measured {measured['delta'] / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB "
          f"(activations {activations / 2**20:.1f}, gradients {gradients / 2**20:.1f}), error {error:+.1%}")
    assert abs(error) <= TOLERANCE, (measured, estimate)


def test_longer_sequence_costs_more_as_predicted(measurements):
    """The growth from the shorter to the longer sequence (S and S^2 terms) is predicted too."""
    short, long_ = SEQ_LENGTHS
    measured_growth = measurements[long_]["delta"] / measurements[short]["delta"]
    estimated = [sum(_estimate(seq, BATCH)) for seq in SEQ_LENGTHS]
    assert estimated[1] / estimated[0] == pytest.approx(measured_growth, rel=TOLERANCE)


def test_weight_and_optimizer_bytes_equal_the_real_models_parameters():
    import numpy as np

    from mindpretrain.parallel.parallel_config import ParallelConfig
    from mindpretrain.planning.cost_model import TrainingSetup, build_plan, optimizer_factor
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
    from mindpretrain.config import load_config

    section = dict(load_config(str(ROOT / "configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml")).model.model_config)
    section.pop("type")
    cfg = DeepseekV3Config(**section)
    model = DeepseekV3ForCausalLM(cfg)
    all_bytes = sum(int(np.prod(p.shape)) * p.data.itemsize for p in model.get_parameters())
    trainable_bytes = sum(int(np.prod(p.shape)) * p.data.itemsize for p in model.trainable_params())
    assert trainable_bytes < all_bytes          # the expert bias is a parameter without optimizer state
    stage = build_plan(cfg, ParallelConfig(), TrainingSetup()).stages[0]
    assert stage.weights == all_bytes
    assert stage.gradients == trainable_bytes
    assert optimizer_factor(cfg) == 2.0         # fp32 parameters: two fp32 AdamW moments, no master copy
    assert stage.optimizer == optimizer_factor(cfg) * trainable_bytes
    assert stage.weights + stage.optimizer == all_bytes + 2 * trainable_bytes


# ------------------------------------------------------------------------------------------ calibration
CALIBRATION_MODELS = {           # not the test's model: one dense layer, then dense + MoE; one head each
    "one_dense_layer": dict(num_hidden_layers=1, num_nextn_predict_layers=0),
    "dense_and_moe": dict(num_hidden_layers=2, num_nextn_predict_layers=0),
}
FITTED = ("SCORE_RETAINED_PER_LAYER", "ATTENTION_BACKWARD_TRANSIENT", "HEAD_BACKWARD_TRANSIENT")


def calibrate():
    """Re-fit the reference-kernel constants of cost_model.py after the model's ops change.

    Measures the calibration models at SEQ_LENGTHS, writes the estimate as a linear function of the
    three fitted constants (HEAD_RETAINED_PER_HEAD stays at its op-derived value) and solves least squares.
    """
    import numpy as np

    from mindpretrain.planning import cost_model

    rows, targets = [], []
    for name, overrides in CALIBRATION_MODELS.items():
        env = dict(os.environ, GLOG_v="3", PLAN_PROBE_OVERRIDES=json.dumps(overrides))
        out = subprocess.run([sys.executable, __file__, str(BATCH)] + [str(seq) for seq in SEQ_LENGTHS],
                             cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        for seq in SEQ_LENGTHS:
            saved = {key: getattr(cost_model, key) for key in FITTED}
            try:
                def estimate(values):
                    for key, value in zip(FITTED, values):
                        setattr(cost_model, key, value)
                    return sum(_estimate(seq, BATCH, overrides))
                base = estimate((0, 0, 0))
                rows.append([estimate(tuple(float(i == j) for j in range(3))) - base for i in range(3)])
                targets.append(measured[str(seq)] - base)
            finally:
                for key, value in saved.items():
                    setattr(cost_model, key, value)
            print(f"{name} seq {seq}: measured {measured[str(seq)] / 2**20:.1f} MiB", file=sys.stderr)
    solution = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]
    return dict(zip(FITTED, (round(float(value), 2) for value in solution)))


if __name__ == "__main__":
    if sys.argv[1] == "--calibrate":
        print(json.dumps(calibrate()))
    else:
        PROBE_MODEL.update(json.loads(os.environ.get("PLAN_PROBE_OVERRIDES", "{}")))
        print(json.dumps(measure([int(arg) for arg in sys.argv[2:]], int(sys.argv[1]))))
