"""Fine-tuning runs through the trainer: packed SFT rows and MindFormers' MindRecord data reach the model with
their five columns, per-token loss counts the global batch's targets, and a run resumes exactly.

The stand-in model (tests/standin_model) takes position_ids, so a column handed over in the wrong order or not
at all changes its loss; the target counts logged per step are recomputed here from the rows the dataset gives.
"""
import numpy as np
import pytest

from conftest import PROJECT_ROOT, STANDIN_MODEL, random_chat_documents, write_mindrecord, write_sft_dataset

ms = pytest.importorskip("mindspore")

from mindpretrain.config import load_config  # noqa: E402
from mindpretrain.data.dataset_builder import build_datasets  # noqa: E402
from mindpretrain.model_builder import build_model  # noqa: E402
from mindpretrain.training.settings import RunSettings  # noqa: E402
from mindpretrain.training.trainer import Trainer  # noqa: E402

VOCAB, SEQ = 64, 32
TINY_SFT = PROJECT_ROOT / "configs" / "deepseek3" / "finetune_deepseek3_tiny_cpu.yaml"
pytestmark = pytest.mark.usefixtures("standin_graph_mode")


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    documents = random_chat_documents(5, 60, (4, 20), VOCAB)
    return write_sft_dataset(tmp_path_factory.mktemp("sft") / "chat", documents)


def sft_overrides(prefix):
    return ["train_dataset.data_loader.datasets_type=SFTDataset",
            f"train_dataset.data_loader.config={{seq_length: {SEQ}, seed: 3, split: '1, 0, 0', pack: True, "
            f"pack_strategy: bfd, pad_token_id: 0, data_path: [{prefix}]}}"]


def make_trainer(tmp_path, overrides, output="out"):
    config = load_config(str(STANDIN_MODEL / "train.yaml"), [f"model.model_config.vocab_size={VOCAB}", *overrides])
    model_config, model = build_model(config, "CPU")
    return Trainer(RunSettings.from_config(config, output_dir=str(tmp_path / output)), model, model_config)


def test_packed_sft_run_logs_the_targets_of_its_rows_and_resumes_exactly(sft_prefix, tmp_path):
    overrides = sft_overrides(sft_prefix) + ["runner_config.train_steps=6", "+runner_config.calculate_per_token_loss=True",
                                             "callbacks.1.save_checkpoint_steps=3"]
    trainer = make_trainer(tmp_path, overrides)
    summary = trainer.train()
    assert summary["status"] == "completed" and trainer.forward_backward.per_token_loss
    rows = build_datasets(load_config(str(STANDIN_MODEL / "train.yaml"), overrides)
                          .get_path("train_dataset.data_loader.config"), [12, 0, 0], "SFTDataset")[0]
    expected = [int(sum(rows[index]["loss_mask"].sum() for index in range(step * 2, step * 2 + 2)))
                for step in range(6)]
    assert [m["target_tokens"] for m in trainer.history] == expected
    resumed = make_trainer(tmp_path, overrides)
    resumed.resume(str(tmp_path / "out" / "checkpoint" / "step_00000003"))
    resumed.train(resume=False)
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in trainer.history[3:]]


def test_position_ids_reach_the_model(sft_prefix, tmp_path):
    """The same rows without their layout columns (a GPT-style loader) give another loss: the columns count."""
    with_layout = make_trainer(tmp_path, sft_overrides(sft_prefix) + ["runner_config.train_steps=1"], "a")
    with_layout.train()
    batch = with_layout._make_stream(1).next_step()
    assert len(batch) == 5 and batch[3].dtype == np.int32 and batch[4].shape == batch[0].shape
    without = make_trainer(tmp_path, sft_overrides(sft_prefix) + ["runner_config.train_steps=1"], "b")
    losses = without.forward_backward(*(ms.Tensor(array) for array in batch[:3]), ms.Tensor(0.0, ms.float32),
                                      ms.Tensor(1.0, ms.float32))[0].asnumpy()
    assert abs(losses[1] - with_layout.history[0]["lm_loss"]) > 1e-4


def test_mindformers_mindrecord_data_trains(tmp_path):
    rng = np.random.RandomState(2)
    records = []
    for _ in range(24):
        input_ids = rng.randint(2, VOCAB, SEQ + 1).astype(np.int32)
        labels = input_ids.copy()
        labels[:int(rng.randint(1, SEQ))] = -100                   # the prompt: not trained
        records.append({"input_ids": input_ids, "labels": labels})
    (tmp_path / "data").mkdir()
    write_mindrecord(tmp_path / "data" / "finetune.mindrecord", records)
    trainer = make_trainer(tmp_path, [
        "train_dataset.data_loader={type: MindDataset, dataset_dir: " + str(tmp_path / "data") + ", shuffle: False, seq_length: 32}",
        "runner_config.train_steps=4"])
    summary = trainer.train()
    assert summary["status"] == "completed"
    first = [int((record["labels"][1:] != -100).sum()) for record in records[:2]]
    assert trainer.history[0]["target_tokens"] == sum(first)
    assert all(np.isfinite(m["loss"]) and not m["skipped"] for m in trainer.history)


def test_tiny_deepseek_v3_packed_rows_per_token_loss_ignore_the_micro_batching(tmp_path):
    """The real model, compiled (GRAPH), on packed rows: 1 micro batch of 4 rows and 2 of 2 give the same per-token
    losses over 3 steps (the same gradients, so the same updates) and the same logged target counts."""
    from mindpretrain import registry

    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    documents = random_chat_documents(9, 40, (6, 40), 129000, bos=0, first_target=2)
    prefix = write_sft_dataset(tmp_path / "chat", documents)

    def run(batch, accumulation, name):
        config = load_config(str(TINY_SFT), [
            f"train_dataset.data_loader.config.data_path=[{prefix}]", "train_dataset.data_loader.config.seq_length=64",
            "runner_config.train_steps=3", f"runner_config.batch_size={batch}",
            f"runner_config.gradient_accumulation_steps={accumulation}", "lr_schedule.warmup_ratio=0.0"])
        ms.set_seed(1234)                                    # both runs start from the same weights
        model_config, model = build_model(config, "CPU")
        trainer = Trainer(RunSettings.from_config(config, output_dir=str(tmp_path / name)), model, model_config)
        trainer.train()
        return trainer.history

    whole, split = run(4, 1, "whole"), run(2, 2, "split")
    assert [m["target_tokens"] for m in whole] == [m["target_tokens"] for m in split]
    for key in ("lm_loss", "mtp_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in split], [m[key] for m in whole], rtol=2e-5, err_msg=key)
    assert whole[2]["lm_loss"] != whole[0]["lm_loss"]                  # the updates really happened
