"""Routed experts stored stacked ([E, out, in], the capacity dispatch's storage for semi-auto parallel) keep
layout-independent checkpoints: a run trained with moe_dispatch capacity writes every expert under its HF name,
and a block-sparse model (one Parameter per expert) resumes it with the same loss; the other way round too."""
import shutil

import numpy as np
import pytest

from conftest import PROJECT_ROOT, random_documents, write_dataset

ms = pytest.importorskip("mindspore")

TINY = PROJECT_ROOT / "configs" / "deepseek3" / "pretrain_deepseek3_tiny_cpu.yaml"


def trainer(data_prefix, output, dispatch, steps=3):
    import mindpretrain.data.loader  # noqa: F401
    import mindpretrain.training  # noqa: F401
    from mindpretrain import registry
    from mindpretrain.config import load_config
    from mindpretrain.model_builder import build_model
    from mindpretrain.training.settings import RunSettings
    from mindpretrain.training.trainer import Trainer

    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(5)
    config = load_config(str(TINY), [
        f"train_dataset.data_loader.config.data_path=[{data_prefix}]", "train_dataset.data_loader.config.seq_length=16",
        "model.model_config.seq_length=16", "model.model_config.vocab_size=256", f"runner_config.train_steps={steps}",
        "runner_config.batch_size=2", f"+model.model_config.moe_dispatch={dispatch}",
        "model.model_config.num_hidden_layers=2", "model.model_config.num_nextn_predict_layers=0",
        "+model.model_config.moe_capacity_factor=4.0"])       # E / K: no assignment is ever dropped
    config["callbacks"][1]["save_checkpoint_steps"] = 2
    model_config, model = build_model(config, "CPU")
    return Trainer(RunSettings.from_config(config, output_dir=str(output)), model, model_config), model


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_dataset(folder / "synthetic", random_documents(3, 60, max_length=120, vocab=256, allow_empty=False))


@pytest.mark.parametrize("first, second", [("capacity", "block_sparse"), ("block_sparse", "capacity")])
def test_a_checkpoint_moves_between_stacked_and_per_expert_storage(data_prefix, tmp_path, first, second):
    from mindpretrain.checkpoint.safetensors_io import open_safetensors
    from mindpretrain.training.checkpoint import MODEL_FILE

    original, model = trainer(data_prefix, tmp_path / "a", first)
    if first == "capacity":
        assert model.model.layers[1].mlp.experts.gate_proj.weight.shape[0] == 8      # stacked storage
    original.train()
    saved = open_safetensors(str(tmp_path / "a" / "checkpoint" / "step_00000002" / MODEL_FILE))
    names = list(saved.keys())
    saved.close()
    assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(8)} <= set(names)
    assert not any(name.endswith("mlp.experts.down_proj.weight") for name in names)
    (tmp_path / "b" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoint" / "step_00000002", tmp_path / "b" / "checkpoint" / "step_00000002")
    resumed, _ = trainer(data_prefix, tmp_path / "b", second)
    resumed.train(resume=True)
    assert [row["step"] for row in resumed.history] == [3]
    for mine, theirs in zip(resumed.history, original.history[2:]):
        np.testing.assert_allclose([mine["loss"], mine["grad_norm"]], [theirs["loss"], theirs["grad_norm"]],
                                   rtol=2e-5)
