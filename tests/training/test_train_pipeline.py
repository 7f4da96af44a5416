"""The pipeline-parallel train step (Ascend semi-auto, pipeline_stage > 1), checked as far as a CPU allows.

MindSpore's `mindspore.parallel.nn.Pipeline` cell runs in stand-alone mode too (it then just slices the batch into micro
batches and sums their outputs, without stages), so the wrapping, the sens-vector backward, the loss
scale and the micro-batch averaging are compared against the plain accumulation step on the same
data. The PipelineGradReducer only returns what a real pipeline pass accumulated (its `accu_grads`
buffers), so here it is only constructed. Nothing in this file ran on Ascend.
"""
import numpy as np
import pytest

from conftest import PROJECT_ROOT, STANDIN_MODEL, random_documents, write_dataset

ms = pytest.importorskip("mindspore")

from mindspore.parallel.nn import Pipeline, PipelineGradReducer  # noqa: E402

from mindpretrain import registry  # noqa: E402
from mindpretrain.config import load_config  # noqa: E402
from mindpretrain.validation import ConfigError  # noqa: E402
from mindpretrain.model_builder import build_model  # noqa: E402
from mindpretrain.parallel.plan import PipelineWrapping  # noqa: E402
from mindpretrain.training.train_step import (ForwardBackwardCell, PipelineForwardBackwardCell,  # noqa: E402
                                              expert_load_shape)
from mindpretrain.training.settings import RunSettings  # noqa: E402
from mindpretrain.training.trainer import Trainer  # noqa: E402

STANDIN = STANDIN_MODEL
VOCAB = 64

pytestmark = pytest.mark.usefixtures("standin_graph_mode")


def standin(**overrides):
    config = registry.build("config", {"type": "StandInConfig", "vocab_size": VOCAB, **overrides})
    return registry.get("model", "StandInMoE")(config)


def test_pipeline_cell_step_equals_micro_batch_accumulation():
    """Pipeline over 2 micro batches of a global batch of 4, loss scale 8 in the sens vector, equals
    ForwardBackwardCell accumulating the same 2 micro batches at scale 1."""
    model = standin()
    rng = np.random.RandomState(0)
    input_ids, labels = (rng.randint(0, VOCAB, (1, 4, 8)).astype(np.int32) for _ in range(2))
    loss_mask = (rng.rand(1, 4, 8) > 0.2).astype(np.float32)
    weights = model.trainable_params()
    pipeline = PipelineForwardBackwardCell(model, weights, micro_batch_num=2, load_shape=expert_load_shape(model),
                                           grad_reducer=False)
    assert isinstance(pipeline.pipeline, Pipeline) and pipeline.pipeline.micro_size == 2
    no_stop = ms.Tensor(0.0, ms.float32)
    losses, load, norm, grads = pipeline(ms.Tensor(input_ids), ms.Tensor(labels), ms.Tensor(loss_mask), no_stop,
                                         ms.Tensor(8.0, ms.float32))
    accumulate = ForwardBackwardCell(model, weights, accumulation_steps=2)
    micro = [ms.Tensor(array.reshape(2, 2, 8)) for array in (input_ids, labels, loss_mask)]
    ref_losses, ref_load, ref_norm, ref_grads = accumulate(*micro, no_stop, ms.Tensor(1.0, ms.float32))
    np.testing.assert_allclose(losses.asnumpy(), ref_losses.asnumpy(), rtol=1e-6)
    np.testing.assert_array_equal(load.asnumpy(), ref_load.asnumpy())
    assert load.shape == (1, 4) and load.asnumpy().sum() == 4 * 8  # every token routed to one expert
    np.testing.assert_allclose(float(norm.asnumpy()), float(ref_norm.asnumpy()), rtol=1e-5)
    for weight, grad, ref in zip(weights, grads, ref_grads):
        np.testing.assert_allclose(grad.asnumpy(), ref.asnumpy(), rtol=1e-5, atol=1e-8, err_msg=weight.name)


def test_grad_reducer_wraps_the_trainable_parameters():
    model = standin()
    weights = model.trainable_params()
    cell = PipelineForwardBackwardCell(model, weights, micro_batch_num=4, load_shape=(1, 4), optimizer_shard=True)
    reducer = cell.grad_reducer
    assert isinstance(reducer, PipelineGradReducer) and reducer.opt_shard is True
    assert [p.name for p in reducer.accu_grads] == ["accu_grads." + w.name for w in weights]
    assert all(acc.shape == w.shape for acc, w in zip(reducer.accu_grads, weights))


def test_trainer_takes_the_pipeline_step_only_when_asked(tmp_path):
    prefix = write_dataset(tmp_path / "data", random_documents(3, 20, max_length=100, vocab=VOCAB,
                                                               allow_empty=False))

    def trainer(*overrides, pipeline=None):
        config = load_config(str(STANDIN / "train.yaml"), [
            f"train_dataset.data_loader.config.data_path=[{prefix}]", f"model.model_config.vocab_size={VOCAB}",
            *overrides])
        model_config, model = build_model(config, "CPU")
        return Trainer(RunSettings.from_config(config, output_dir=str(tmp_path / "out")), model, model_config,
                       pipeline=pipeline)

    assert isinstance(trainer().forward_backward, ForwardBackwardCell)
    wrapping = PipelineWrapping(stages=2, micro_batch_num=4)
    step = trainer("runner_config.batch_size=8", pipeline=wrapping).forward_backward
    assert isinstance(step, PipelineForwardBackwardCell) and step.micro_batch_num == 4
    assert isinstance(step.grad_reducer, PipelineGradReducer)
    with pytest.raises(ConfigError, match="use gradient_accumulation_steps 1"):
        trainer("runner_config.gradient_accumulation_steps=2", pipeline=wrapping)


def test_pipeline_cell_wraps_the_tiny_deepseek_v3():
    """The real tiny model's parameters all get an accumulation buffer, and its MoE layers fix the
    expert-load shape (constructed only: running it would compile the full model)."""
    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    config = load_config(str(PROJECT_ROOT / "configs" / "deepseek3" / "pretrain_deepseek3_tiny_cpu.yaml"))
    model_config, model = build_model(config, "CPU")
    weights = model.trainable_params()
    cell = PipelineForwardBackwardCell(model, weights, micro_batch_num=2, load_shape=expert_load_shape(model))
    # the model's own contract for update_expert_bias: [MoE blocks incl. MTP, n_routed_experts]
    moe_blocks = model_config.num_hidden_layers - model_config.first_k_dense_replace + 1  # + the MTP block
    assert expert_load_shape(model) == (moe_blocks, model_config.n_routed_experts) == (3, 8)
    assert len(cell.grad_reducer.accu_grads) == len(weights)
