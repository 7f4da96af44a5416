"""The training loop on a tiny stand-in MoE model (tests/standin_model): exact resume, NaN skipping,
checkpoint refusal and fallback, SIGTERM, data exhaustion, TensorBoard, expert-bias updates.

The stand-in has the DeepSeek-V3 training-call contract but compiles in seconds, so these tests
exercise the trainer's own logic; tests/test_train_deepseek3.py runs the real model.
"""
import json
import os
import shutil
import signal

import numpy as np
import pytest

from conftest import STANDIN_MODEL, STANDIN_VOCAB, write_dataset

ms = pytest.importorskip("mindspore")

from mindpretrain.config import load_config  # noqa: E402

from mindpretrain.validation import ConfigError  # noqa: E402
from mindpretrain.training import checkpoint as ckpt  # noqa: E402
from mindpretrain.model_builder import build_model  # noqa: E402
from mindpretrain.training.settings import RunSettings  # noqa: E402
from mindpretrain.training.trainer import Trainer, TrainingError  # noqa: E402

STANDIN = STANDIN_MODEL
VOCAB = STANDIN_VOCAB

pytestmark = pytest.mark.usefixtures("standin_graph_mode")


def make_config(standin_corpus, *overrides):
    return load_config(str(STANDIN / "train.yaml"), [
        f"train_dataset.data_loader.config.data_path=[{standin_corpus}]",
        f"model.model_config.vocab_size={VOCAB}", *overrides])


def make_trainer(config, output_dir):
    model_config, model = build_model(config, "CPU")
    return Trainer(RunSettings.from_config(config, output_dir=str(output_dir)), model, model_config)


def params_of(trainer):
    state = {name: p.asnumpy().copy() for name, p in trainer.params.items()}
    state.update({"opt." + name: p.asnumpy().copy() for name, p in trainer.optimizer.state_parameters().items()})
    return state


@pytest.fixture(scope="module")
def uninterrupted(standin_corpus, tmp_path_factory):
    """12 steps with checkpoints every 6 (the reference every resume test compares against)."""
    output = tmp_path_factory.mktemp("run12")
    trainer = make_trainer(make_config(standin_corpus), output)
    summary = trainer.train()
    return trainer, summary, output


def test_loss_decreases_and_checkpoints_are_kept(uninterrupted):
    trainer, summary, output = uninterrupted
    assert summary["status"] == "completed" and summary["steps"] == 12
    losses = [m["lm_loss"] for m in trainer.history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    steps = [step for step, _ in ckpt.list_checkpoints(ckpt.checkpoint_root(str(output)))]
    assert steps == [12, 6]  # keep_checkpoint_max: 2
    lines = (output / "metrics" / "rank_0.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))


def test_resume_from_step_6_matches_uninterrupted_run_to_the_bit(uninterrupted, standin_corpus, tmp_path):
    reference, _, output = uninterrupted
    # a run that stopped after step 6: only its step-6 checkpoint exists
    shutil.copytree(output / "checkpoint" / "step_00000006", tmp_path / "checkpoint" / "step_00000006")
    resumed = make_trainer(make_config(standin_corpus), tmp_path)
    summary = resumed.train(resume=True)
    assert summary["steps"] == 12
    assert [m["step"] for m in resumed.history] == list(range(7, 13))
    for mine, theirs in zip(resumed.history, reference.history[6:]):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr"):
            assert mine[key] == theirs[key], (mine["step"], key)
    expected, actual = params_of(reference), params_of(resumed)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_expert_bias_of_overloaded_expert_goes_down(uninterrupted):
    trainer, _, _ = uninterrupted
    rate = trainer.model_config.topk_bias_update_rate
    bias = trainer.model.bias.asnumpy().copy()
    load = np.array([[40.0, 10.0, 10.0, 4.0]], np.float32)
    trainer._reduce_expert_load(load)
    change = trainer.model.bias.asnumpy() - bias
    np.testing.assert_allclose(change, [-rate, rate, rate, rate], rtol=1e-5)
    trainer.model.bias.set_data(ms.Tensor(bias))
    # in the loop: biases moved away from zero only in steps of `rate`
    moved = np.abs(bias) / rate
    assert np.allclose(moved, np.round(moved), atol=1e-3) and moved.max() > 0


def test_nan_steps_are_skipped_then_training_stops(standin_corpus, tmp_path, monkeypatch):
    trainer = make_trainer(make_config(standin_corpus, "runner_config.max_consecutive_nan_steps=2",
                                       "runner_config.train_steps=8"), tmp_path)
    original = trainer.forward_backward
    poisoned_steps = {2, 4, 5}
    snapshots = {}

    def forward_backward(*inputs):
        losses, load, grad_norm, grads = original(*inputs)
        step = trainer.step + 1
        snapshots[step] = params_of(trainer)
        if step in poisoned_steps:
            losses = losses * ms.Tensor(float("nan"), ms.float32)
        return losses, load, grad_norm, grads

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)
    with pytest.raises(TrainingError, match="2 consecutive steps"):
        trainer.train()
    skipped = [m["step"] for m in trainer.history if m["skipped"]]
    assert skipped == [2, 4, 5] and trainer.step == 5
    after_skip = snapshots[3]  # state after step 2 (skipped) == state before step 2
    for name, value in snapshots[2].items():
        np.testing.assert_array_equal(after_skip[name], value, err_msg=name)
    assert any(not np.array_equal(snapshots[4][name], snapshots[3][name]) for name in snapshots[3])


def test_refuses_checkpoint_of_another_model_shape(uninterrupted, standin_corpus, tmp_path):
    _, _, output = uninterrupted
    other = make_trainer(make_config(standin_corpus, "model.model_config.hidden_size=8"), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)does not fit this model.*model.embed_tokens.weight: shape "
                                                    r"\[256, 16\] in the checkpoint, \[256, 8\] in the model"):
        other.resume(str(output / "checkpoint"))


def test_truncated_only_checkpoint_is_refused_and_corrupt_newest_falls_back(uninterrupted, standin_corpus,
                                                                             tmp_path, caplog):
    _, _, output = uninterrupted
    root = tmp_path / "checkpoint"
    shutil.copytree(output / "checkpoint", root)
    model_file = root / "step_00000012" / ckpt.MODEL_FILE
    with open(model_file, "r+b") as handle:
        handle.truncate(os.path.getsize(model_file) - 100)
    trainer = make_trainer(make_config(standin_corpus), tmp_path)
    with caplog.at_level("WARNING", logger="mindpretrain"):
        used = trainer.resume(str(root))
    assert used.endswith("step_00000006") and trainer.step == 6
    assert "truncated" in caplog.text and "previous good checkpoint" in caplog.text
    shutil.rmtree(root / "step_00000006")
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)no usable checkpoint.*model.safetensors is truncated"):
        trainer.resume(str(root))
    with pytest.raises(ckpt.CheckpointError, match="no COMPLETE marker|truncated"):
        os.remove(root / "step_00000012" / ckpt.COMPLETE_MARKER)
        ckpt.verify_checkpoint(str(root / "step_00000012"))


def test_sigterm_finishes_the_step_saves_and_stops(standin_corpus, tmp_path, monkeypatch):
    trainer = make_trainer(make_config(standin_corpus), tmp_path)
    original = trainer._make_stream

    def make_stream(total_steps):
        stream = original(total_steps)
        next_step = stream.next_step

        def next_step_then_signal():
            batch = next_step()
            if stream.consumed_samples == 3 * stream.samples_per_step:  # step 3's data is loaded
                os.kill(os.getpid(), signal.SIGTERM)
            return batch
        stream.next_step = next_step_then_signal
        return stream

    monkeypatch.setattr(trainer, "_make_stream", make_stream)
    summary = trainer.train()
    assert summary["status"] == "terminated"
    # step 3 (in flight when the signal came) completes with its update, then the run stops
    assert trainer.step == 3 and not trainer.history[-1]["skipped"]
    newest = ckpt.find_resumable(ckpt.checkpoint_root(str(tmp_path)))
    assert newest.endswith("step_00000003")
    assert ckpt.read_trainer_state(newest)["consumed_samples"] == 3 * 2
    assert signal.getsignal(signal.SIGTERM) is not trainer.stop_request._handle


def test_data_exhausted_stops_with_message_or_wraps(tmp_path, caplog):
    # 3 documents of 50 tokens: one epoch holds (150 - 1) // 32 = 4 samples = 2 steps of 2 samples
    small = write_dataset(tmp_path / "small", [np.arange(50) + 50 * index for index in range(3)])
    config = make_config(small, "runner_config.train_steps=5", "train_dataset.data_loader.sizes=[1, 0, 0]")
    with caplog.at_level("ERROR", logger="mindpretrain"):
        summary = make_trainer(config, tmp_path / "stop").train()
    assert summary["status"] == "data_exhausted" and summary["steps"] == 2
    assert "exhausted after 4 samples" in caplog.text and "next_epoch" in caplog.text
    assert ckpt.find_resumable(str(tmp_path / "stop" / "checkpoint")).endswith("step_00000002")
    config = make_config(small, "runner_config.train_steps=5", "train_dataset.data_loader.sizes=[1, 0, 0]",
                         "runner_config.data_exhausted=next_epoch")
    wrapped = make_trainer(config, tmp_path / "wrap")
    assert wrapped.train()["status"] == "completed"
    stream = wrapped._make_stream(5)
    first = stream.next_step()
    stream.next_step()
    np.testing.assert_array_equal(stream.next_step()[0], first[0])  # step 3 starts epoch 2: step 1's batch


def test_tensorboard_event_file_has_every_step(standin_corpus, tmp_path):
    from mindpretrain.training.tensorboard import read_scalars

    config = make_config(standin_corpus, "runner_config.train_steps=3", f"tensorboard.tensorboard_dir={tmp_path}/tb")
    trainer = make_trainer(config, tmp_path)
    trainer.train()
    (event_file,) = (tmp_path / "tb").iterdir()
    events = read_scalars(str(event_file))
    assert [step for step, _ in events] == [1, 2, 3]
    assert events[0][1]["loss"] == pytest.approx(trainer.history[0]["loss"], rel=1e-6)


def test_settings_are_validated_before_training(standin_corpus):
    with pytest.raises(ConfigError, match=r"runner_config.batch_size \(0\) must be a positive integer"):
        make_trainer(make_config(standin_corpus, "runner_config.batch_size=0"), "/nonexistent")
    with pytest.raises(ConfigError, match="data_exhausted"):
        make_trainer(make_config(standin_corpus, "runner_config.data_exhausted=loop"), "/nonexistent")


def test_load_checkpoint_takes_weights_only(uninterrupted, standin_corpus, tmp_path):
    reference, _, output = uninterrupted
    finetune = make_trainer(make_config(standin_corpus, "runner_config.train_steps=1"), tmp_path)
    finetune.checkpoints.load_weights(str(output / "checkpoint" / "step_00000012"))
    for name, param in finetune.params.items():
        np.testing.assert_array_equal(param.asnumpy(), reference.params[name].asnumpy(), err_msg=name)
    assert finetune.step == 0 and float(finetune.optimizer.adam_step.asnumpy()[0]) == 0.0


def test_gradient_accumulation_equals_the_larger_batch(standin_corpus, tmp_path):
    """2 micro batches of 1 sample accumulate to the same update as one batch of 2 samples."""
    runs = []
    for batch, accumulation in ((2, 1), (1, 2)):
        config = make_config(standin_corpus, "runner_config.train_steps=3", f"runner_config.batch_size={batch}",
                             f"runner_config.gradient_accumulation_steps={accumulation}")
        trainer = make_trainer(config, tmp_path / f"b{batch}a{accumulation}")
        trainer.train()
        runs.append(trainer)
    large, accumulated = runs
    assert [m["consumed_samples"] for m in large.history] == [m["consumed_samples"] for m in accumulated.history]
    for one, two in zip(large.history, accumulated.history):
        np.testing.assert_allclose([one["loss"], one["grad_norm"]], [two["loss"], two["grad_norm"]], rtol=1e-5)
    for name, param in large.params.items():
        np.testing.assert_allclose(accumulated.params[name].asnumpy(), param.asnumpy(), rtol=1e-4, atol=1e-6)


def test_sequence_longer_than_the_model_is_refused(standin_corpus):
    config = make_config(standin_corpus)
    model_config, model = build_model(config, "CPU")
    model_config.seq_length = 16
    with pytest.raises(ConfigError, match=r"seq_length \(32\) must not exceed model.model_config.seq_length \(16\)"):
        Trainer(RunSettings.from_config(config, output_dir="/nonexistent"), model, model_config)


def test_without_train_steps_the_run_is_epochs_of_the_dataset(tmp_path):
    small = write_dataset(tmp_path / "small", [np.arange(50) + 50 * index for index in range(3)])
    config = make_config(small, "runner_config.train_steps=null", "runner_config.epochs=2",
                         "train_dataset.data_loader.sizes=[1, 0, 0]", "runner_config.data_exhausted=next_epoch")
    summary = make_trainer(config, tmp_path / "out").train()
    assert summary["status"] == "completed" and summary["total_steps"] == 4  # 2 epochs x 4 samples / 2 per step
