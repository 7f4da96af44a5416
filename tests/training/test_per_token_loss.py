"""`calculate_per_token_loss`: the step's loss is sum(CE) / sum(targets) over the whole global batch.

The reference is computed without the train step's scaling: the model's own per-micro-batch MEAN losses,
weighted by each micro batch's target count. With unequal counts the per-micro-batch average (the default)
differs from it, so the comparison can fail. Gradients must not depend on how the global batch is cut into
micro batches. The pipeline cell (Ascend) runs stand-alone here, as in test_train_pipeline.py.
"""
import numpy as np
import pytest

from conftest import STANDIN_MODEL, random_documents, write_dataset

ms = pytest.importorskip("mindspore")

from mindpretrain import registry  # noqa: E402
from mindpretrain.config import load_config  # noqa: E402
from mindpretrain.model_builder import build_model  # noqa: E402
from mindpretrain.training.settings import RunSettings  # noqa: E402
from mindpretrain.training.train_step import (ForwardBackwardCell, PipelineForwardBackwardCell,  # noqa: E402
                                              expert_load_shape)
from mindpretrain.training.trainer import Trainer  # noqa: E402
from mindpretrain.validation import ConfigError  # noqa: E402

VOCAB = 64
pytestmark = pytest.mark.usefixtures("standin_graph_mode")


def standin():
    config = registry.build("config", {"type": "StandInConfig", "vocab_size": VOCAB})
    return registry.get("model", "StandInMoE")(config)


def unequal_batch():
    """Two rows of 12 positions with 11 and 2 targets: per-micro-batch means weight them very differently."""
    rng = np.random.RandomState(3)
    input_ids, labels = (rng.randint(0, VOCAB, (2, 12)).astype(np.int32) for _ in range(2))
    loss_mask = np.zeros((2, 12), np.float32)
    loss_mask[0, 1:] = 1.0
    loss_mask[1, [4, 9]] = 1.0
    return input_ids, labels, loss_mask


def run_cell(model, arrays, accumulation, per_token):
    """The forward/backward cell over the batch cut into `accumulation` micro batches."""
    cell = ForwardBackwardCell(model, model.trainable_params(), accumulation_steps=accumulation,
                               per_token_loss=per_token)
    micro = [ms.Tensor(array.reshape((accumulation, -1) + array.shape[1:])) for array in arrays]
    losses, _, norm, grads = cell(*micro[:3], ms.Tensor(0.0, ms.float32), ms.Tensor(1.0, ms.float32), *micro[3:])
    return losses.asnumpy(), float(norm.asnumpy()), [grad.asnumpy() for grad in grads]


def token_weighted_reference(arrays):
    """sum_i mean_i * n_i / sum_i n_i from the model's own mean losses, one row at a time."""
    model = standin()
    input_ids, labels, loss_mask = arrays
    total, count = 0.0, 0.0
    for row in range(input_ids.shape[0]):
        outputs = model(*(ms.Tensor(array[row:row + 1]) for array in arrays))
        targets = float(loss_mask[row].sum())
        total += float(outputs[1].asnumpy()) * targets
        count += targets
    return total / count


def test_per_token_loss_is_the_token_weighted_mean_whatever_the_micro_batching():
    arrays = unequal_batch()
    model = standin()
    model.set_loss_reduction("sum")
    one_by_two = run_cell(model, arrays, accumulation=1, per_token=True)
    two_by_one = run_cell(model, arrays, accumulation=2, per_token=True)
    reference = token_weighted_reference(arrays)
    np.testing.assert_allclose(one_by_two[0][1], reference, rtol=1e-5)
    np.testing.assert_allclose(two_by_one[0][1], reference, rtol=1e-5)
    assert one_by_two[0][5] == two_by_one[0][5] == 13            # target tokens of the global batch
    np.testing.assert_allclose(two_by_one[1], one_by_two[1], rtol=1e-5)
    for grad_a, grad_b in zip(one_by_two[2], two_by_one[2]):
        np.testing.assert_allclose(grad_a, grad_b, rtol=1e-5, atol=1e-7)


def test_default_averages_micro_batches_and_so_differs():
    """Without per-token loss, 2 micro batches of 1 average the two rows' means: not the token-weighted mean."""
    arrays = unequal_batch()
    losses, _, _ = run_cell(standin(), arrays, accumulation=2, per_token=False)
    assert abs(losses[1] - token_weighted_reference(arrays)) > 1e-3
    assert losses[5] == 13


def test_pipeline_cell_takes_the_same_per_token_loss():
    arrays = unequal_batch()
    model = standin()
    model.set_loss_reduction("sum")
    cell = PipelineForwardBackwardCell(model, model.trainable_params(), micro_batch_num=2,
                                       load_shape=expert_load_shape(model), grad_reducer=False, per_token_loss=True)
    losses, _, norm, grads = cell(*(ms.Tensor(array[None]) for array in arrays), ms.Tensor(0.0, ms.float32),
                                  ms.Tensor(1.0, ms.float32))
    reference = run_cell(model, arrays, accumulation=2, per_token=True)
    np.testing.assert_allclose(losses.asnumpy(), reference[0], rtol=1e-5)
    for grad, ref in zip(grads, reference[2]):
        np.testing.assert_allclose(grad.asnumpy(), ref, rtol=1e-5, atol=1e-7)


def test_layout_columns_reach_the_model():
    """Extra columns (position_ids, actual_seq_len) are passed through to the model, micro batch by micro batch."""
    input_ids, labels, loss_mask = unequal_batch()
    positions = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    ends = np.full((2, 12), 12, np.int32)
    model = standin()
    with_layout = run_cell(model, (input_ids, labels, loss_mask, positions, ends), accumulation=2, per_token=False)
    without = run_cell(model, (input_ids, labels, loss_mask), accumulation=2, per_token=False)
    direct = [float(model(*(ms.Tensor(a[row:row + 1]) for a in (input_ids, labels, loss_mask, positions, ends)))[1]
                    .asnumpy()) for row in range(2)]
    np.testing.assert_allclose(with_layout[0][1], np.mean(direct), rtol=1e-5)
    assert abs(with_layout[0][1] - without[0][1]) > 1e-4


def test_trainer_reads_calculate_per_token_loss(tmp_path):
    prefix = write_dataset(tmp_path / "data", random_documents(3, 20, max_length=100, vocab=VOCAB,
                                                               allow_empty=False))

    def trainer(*overrides):
        config = load_config(str(STANDIN_MODEL / "train.yaml"), [
            f"train_dataset.data_loader.config.data_path=[{prefix}]", f"model.model_config.vocab_size={VOCAB}",
            "runner_config.train_steps=2", *overrides])
        model_config, model = build_model(config, "CPU")
        return Trainer(RunSettings.from_config(config, output_dir=str(tmp_path / "out")), model, model_config)

    per_token = trainer("+runner_config.calculate_per_token_loss=True")
    assert per_token.forward_backward.per_token_loss and per_token.model.reduction == "sum"
    summary = per_token.train()
    assert summary["status"] == "completed"
    # pretraining samples: every position of every sample is a target (batch 2 x seq 32)
    assert [m["target_tokens"] for m in per_token.history] == [64, 64]
    assert trainer().model.reduction == "mean"
    with pytest.raises(ConfigError, match="calculate_per_token_loss"):
        trainer("+runner_config.calculate_per_token_loss=3")
