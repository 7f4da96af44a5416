"""Dynamic loss scaling (runner_wrapper.scale_sense) with float16 compute on CPU, on the stand-in model
computing its matmuls in float16: the update rule equals MindSpore's DynamicLossScaleUpdateCell, real
float16 overflows skip the step and halve the scale, the scale grows after `scale_window` clean steps,
the gradients the optimizer sees are unscaled, and a resume across scale changes is bit-exact.
"""
import json
import shutil

import numpy as np
import pytest

from conftest import PROJECT_ROOT, STANDIN_MODEL, STANDIN_VOCAB

ms = pytest.importorskip("mindspore")

from mindpretrain import registry  # noqa: E402
from mindpretrain.config import load_config  # noqa: E402
from mindpretrain.validation import ConfigError  # noqa: E402
from mindpretrain.training import checkpoint as ckpt  # noqa: E402
from mindpretrain.model_builder import build_model  # noqa: E402
from mindpretrain.training.loss_scale import LossScaler, build_loss_scaler  # noqa: E402
from mindpretrain.training.lr_schedule import build_lr_schedule  # noqa: E402
from mindpretrain.training.progress import format_step_line  # noqa: E402
from mindpretrain.training.settings import RunSettings  # noqa: E402
from mindpretrain.training.trainer import Trainer  # noqa: E402

STANDIN = STANDIN_MODEL
VOCAB = STANDIN_VOCAB
DYNAMIC = "{{type: DynamicLossScaleUpdateCell, loss_scale_value: {value}, scale_factor: 2, scale_window: {window}}}"


pytestmark = pytest.mark.usefixtures("standin_graph_mode")


def make_trainer(standin_corpus, output_dir, *overrides, half=True):
    config = load_config(str(STANDIN / "train.yaml"), [
        f"train_dataset.data_loader.config.data_path=[{standin_corpus}]", f"model.model_config.vocab_size={VOCAB}",
        *(["+model.model_config.compute_dtype=float16"] if half else []), *overrides])
    model_config, model = build_model(config, "CPU")
    return Trainer(RunSettings.from_config(config, output_dir=str(output_dir)), model, model_config)


def state_of(trainer):
    state = {name: p.asnumpy().copy() for name, p in trainer.params.items()}
    state.update({"opt." + name: p.asnumpy().copy() for name, p in trainer.optimizer.state_parameters().items()})
    return state


def replay(scaler, skipped):
    """The scale before each step according to LossScaler, given which steps overflowed."""
    scales = []
    for overflow in skipped:
        scales.append(scaler.scale)
        scaler.update(overflow)
    return scales


# --- the rule and the YAML -----------------------------------------------------------------------------------

def test_update_rule_equals_mindspore_dynamic_loss_scale_update_cell():
    rng = np.random.RandomState(3)
    overflows = [bool(flag) for flag in rng.rand(60) < 0.3] + [True] * 6 + [False] * 20
    cell = ms.nn.DynamicLossScaleUpdateCell(loss_scale_value=16.0, scale_factor=2, scale_window=3)
    scale = ms.Parameter(ms.Tensor(16.0, ms.float32), name="loss_scale")
    expected = []
    for overflow in overflows:
        cell(scale, ms.Tensor(overflow, ms.bool_))
        expected.append(float(scale.asnumpy()))
    ours = LossScaler(16.0, scale_factor=2.0, scale_window=3)
    assert [ours.update(overflow) for overflow in overflows] == expected
    assert min(expected) == 1.0 and max(expected) > 16.0  # the run hits the floor and grows past the start


def test_scale_sense_forms_of_the_yaml():
    dynamic = build_loss_scaler({"scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536,
                                                 "scale_factor": 2, "scale_window": 1000}})
    assert (dynamic.scale, dynamic.scale_factor, dynamic.scale_window, dynamic.dynamic) == (65536.0, 2.0, 1000, True)
    assert build_loss_scaler({}) is None and build_loss_scaler(None) is None
    assert build_loss_scaler({"scale_sense": 1.0}) is None  # MindFormers' bf16 YAMLs: no scaling at all
    fixed = build_loss_scaler({"scale_sense": 1024})
    assert not fixed.dynamic and fixed.update(True) == 1024.0 and fixed.at_minimum
    fixed = build_loss_scaler({"scale_sense": {"type": "FixedLossScaleUpdateCell", "loss_scale_value": 128}})
    assert fixed.scale == 128.0 and not fixed.dynamic
    with pytest.raises(ConfigError, match=r"scale_factor \(1\) must be a number greater than 1"):
        build_loss_scaler({"scale_sense": {"loss_scale_value": 8, "scale_factor": 1, "scale_window": 10}})
    with pytest.raises(ConfigError, match=r"scale_window \(0\) must be a positive integer"):
        build_loss_scaler({"scale_sense": {"loss_scale_value": 8, "scale_window": 0}})
    with pytest.raises(ConfigError, match=r"scale_sense.type \('AdaptiveLossScaleUpdateCell'\) must be"):
        build_loss_scaler({"scale_sense": {"type": "AdaptiveLossScaleUpdateCell", "loss_scale_value": 8}})
    with pytest.raises(ConfigError, match=r"scale_sense \(\['scale_windw'\]\) are unknown keys"):
        build_loss_scaler({"scale_sense": {"loss_scale_value": 8, "scale_windw": 10}})
    with pytest.raises(ConfigError, match=r"scale_sense \(-2\) must be a positive number"):
        build_loss_scaler({"scale_sense": -2})


# --- float16 runs ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing_run(standin_corpus, tmp_path_factory):
    """12 float16 steps starting at scale 2^24, where the float16 logit gradients (~scale / tokens)
    overflow, window 3, checkpoints at 6 and 12; one non-finite step in a row would stop a run
    (max_consecutive_nan_steps=1), so overflows must not count as NaN steps."""
    output = tmp_path_factory.mktemp("fp16")
    trainer = make_trainer(standin_corpus, output, "runner_config.max_consecutive_nan_steps=1",
                           "+runner_wrapper.scale_sense=" + DYNAMIC.format(value=2 ** 24, window=3))
    summary = trainer.train()
    return trainer, summary, output


def test_real_float16_overflow_shrinks_then_the_scale_regrows(overflowing_run):
    trainer, summary, _ = overflowing_run
    history = trainer.history
    scales = [m["loss_scale"] for m in history]
    skipped = [m["skipped"] for m in history]
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert scales[:2] == [2.0 ** 24, 2.0 ** 23] and skipped[:2] == [True, True]
    assert not all(skipped) and summary["skipped_steps"] == sum(skipped)
    # every logged scale is what MindSpore's rule gives for this overflow pattern ...
    assert scales == replay(LossScaler(2.0 ** 24, 2.0, 3), skipped)
    # ... which here includes growth after 3 clean steps and the overflow it provokes again
    grew = [k for k in range(1, 12) if scales[k] == 2 * scales[k - 1]]
    assert grew and all(not any(skipped[k - 3:k]) for k in grew)
    for m in history:
        assert np.isfinite(m["loss"]) and (m["skipped"] or np.isfinite(m["grad_norm"]))
    state = ckpt.read_trainer_state(str(ckpt.find_resumable(ckpt.checkpoint_root(str(overflowing_run[2])))))
    assert state["loss_scale"] == trainer.loss_scaler.state_dict()


def test_resume_across_scale_changes_matches_the_uninterrupted_run(overflowing_run, standin_corpus, tmp_path):
    reference, _, output = overflowing_run
    step6 = output / "checkpoint" / "step_00000006"
    saved_scale = json.loads((step6 / ckpt.STATE_FILE).read_text())["loss_scale"]
    assert saved_scale["scale"] != 2 ** 24  # the scale moved before the checkpoint
    assert saved_scale["scale"] == reference.history[6]["loss_scale"]
    shutil.copytree(step6, tmp_path / "checkpoint" / "step_00000006")
    resumed = make_trainer(standin_corpus, tmp_path, "runner_config.max_consecutive_nan_steps=1",
                           "+runner_wrapper.scale_sense=" + DYNAMIC.format(value=2 ** 24, window=3))
    resumed.train(resume=True)
    assert [m["step"] for m in resumed.history] == list(range(7, 13))
    for mine, theirs in zip(resumed.history, reference.history[6:]):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "loss_scale", "skipped"):
            np.testing.assert_array_equal(mine[key], theirs[key], err_msg=f"step {mine['step']} {key}")
    assert resumed.loss_scaler.state_dict() == reference.loss_scaler.state_dict()
    expected, actual = state_of(reference), state_of(resumed)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_injected_overflow_skips_the_update_and_halves_then_grows(standin_corpus, tmp_path, monkeypatch):
    """Scale 1024 never overflows here; steps 2 and 7 get a scale of 2^40 fed into the compiled step
    (a real float16 overflow in the backward). Window 3: the scale halves at each and doubles back
    after three clean steps."""
    trainer = make_trainer(standin_corpus, tmp_path, "runner_config.train_steps=11",
                           "+runner_wrapper.scale_sense=" + DYNAMIC.format(value=1024, window=3))
    original = trainer.forward_backward
    before = {}

    def forward_backward(*inputs):
        step = trainer.step + 1
        before[step] = state_of(trainer)
        if step in (2, 7):
            inputs = inputs[:-1] + (ms.Tensor(2.0 ** 40, ms.float32),)
        return original(*inputs)

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)
    trainer.train()
    assert [m["loss_scale"] for m in trainer.history] == [1024, 1024, 512, 512, 512, 1024, 1024, 512, 512, 512, 1024]
    assert [m["step"] for m in trainer.history if m["skipped"]] == [2, 7]
    assert [m["step"] for m in trainer.history if m["overflow"]] == [2, 7]  # overflows, not NaN steps
    assert "loss_scale 512 " in format_step_line(trainer.history[2])
    assert "gradient overflow" in format_step_line(trainer.history[1])
    for skipped_step in (2, 7):  # nothing moved: parameters, moments, Adam's step count
        for name, value in before[skipped_step].items():
            np.testing.assert_array_equal(before[skipped_step + 1][name], value, err_msg=name)
    assert float(trainer.optimizer.adam_step.asnumpy()[0]) == 9.0
    # the learning-rate schedule advances with applied updates only (MindFormers' optimizer global_step)
    applied_before = [0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8]
    schedule = build_lr_schedule(trainer.settings.run_config.get("lr_schedule"), 11)
    assert [m["lr"] for m in trainer.history] == [schedule(position) for position in applied_before]
    assert trainer.nan_in_a_row == 0


def test_scaled_float16_gradients_reach_the_optimizer_unscaled(standin_corpus, tmp_path):
    """float16 at scale 1024 trains like float32 without scaling: same losses and gradient norms to
    float16 accuracy (a missing unscale would make the norm 1024 times larger)."""
    half = make_trainer(standin_corpus, tmp_path / "half", "runner_config.train_steps=3",
                        "+runner_wrapper.scale_sense=" + DYNAMIC.format(value=1024, window=1000))
    full = make_trainer(standin_corpus, tmp_path / "full", "runner_config.train_steps=3", half=False)
    half.train()
    full.train()
    for scaled, reference in zip(half.history, full.history):
        assert scaled["loss_scale"] == 1024 and "loss_scale" not in reference
        np.testing.assert_allclose([scaled["lm_loss"], scaled["grad_norm"]],
                                   [reference["lm_loss"], reference["grad_norm"]], rtol=1e-3)


def test_tiny_deepseek_v3_in_float16_overflows_and_recovers(standin_corpus, tmp_path):
    """The real tiny DeepSeek-V3 computing in float16: started at 2^21 with scale_window 1, the scale
    falls until the float16 backward fits and then oscillates around the largest scale that does,
    exactly by MindSpore's rule, with every applied step finite."""
    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    config = load_config(str(PROJECT_ROOT / "configs" / "deepseek3" / "pretrain_deepseek3_tiny_cpu.yaml"), [
        f"train_dataset.data_loader.config.data_path=[{standin_corpus}]", "train_dataset.data_loader.config.seq_length=32",
        "runner_config.train_steps=8", "runner_config.batch_size=2", "model.model_config.compute_dtype=float16",
        "runner_config.max_consecutive_nan_steps=1", "callbacks.1.save_checkpoint_steps=100",
        "+runner_wrapper.scale_sense=" + DYNAMIC.format(value=2 ** 21, window=1)])
    model_config, model = build_model(config, "CPU")
    assert model_config.compute_dtype == "float16"
    trainer = Trainer(RunSettings.from_config(config, output_dir=str(tmp_path)), model, model_config)
    assert trainer.train()["status"] == "completed"
    scales = [m["loss_scale"] for m in trainer.history]
    skipped = [m["skipped"] for m in trainer.history]
    assert scales == replay(LossScaler(2.0 ** 21, 2.0, 1), skipped)
    assert any(skipped) and not all(skipped)
    assert any(scales[k] == 2 * scales[k - 1] for k in range(1, len(scales)))  # grew after a clean step
    assert all(np.isfinite(m["grad_norm"]) and np.isfinite(m["loss"]) for m in trainer.history if not m["skipped"])
