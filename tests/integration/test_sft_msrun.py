"""Packed fine-tuning under msrun with 2 CPU workers and per-token loss: the ranks' rows have different target
counts, and the loss must still be sum(CE) / targets of the whole global batch, so 2 workers x 2 rows equal one
process with 4 rows, step after step. Without the all-reduced target count each rank would normalise by its own
and the two runs would part at the first step.
"""
import json
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT, random_chat_documents, write_sft_dataset
from msrun_helpers import MsrunJob

if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

pytest.importorskip("mindspore")

STANDIN = PROJECT_ROOT / "tests" / "standin_model"
LAUNCH_TIMEOUT = 900   # a hang guard for a loaded machine, not a performance bound
VOCAB, SEQ, STEPS = 64, 32, 4


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    documents = random_chat_documents(17, 80, (4, 24), VOCAB)
    return write_sft_dataset(tmp_path_factory.mktemp("sft") / "chat", documents)


def run_args(prefix, output_dir, batch_size):
    return ["--config", str(STANDIN / "train.yaml"), "--register_path", str(STANDIN), "--output_dir", str(output_dir),
            f"--model.model_config.vocab_size={VOCAB}", "--train_dataset.data_loader.datasets_type=SFTDataset",
            f"--train_dataset.data_loader.config.seq_length={SEQ}", f"--train_dataset.data_loader.config.data_path=[{prefix}]",
            "--+train_dataset.data_loader.config.pack=True", "--+train_dataset.data_loader.config.pad_token_id=0",
            f"--runner_config.train_steps={STEPS}",
            f"--runner_config.batch_size={batch_size}", "--+runner_config.calculate_per_token_loss=True"]


def read_metrics(output_dir, rank):
    path = output_dir / "metrics" / f"rank_{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_workers_take_the_global_per_token_loss_of_one_process(sft_prefix, tmp_path):
    import run_mindformer

    parallel = tmp_path / "dp2"
    with MsrunJob(" ".join(["run_mindformer.py", *run_args(sft_prefix, parallel, 2)]), 2,
                  parallel / "msrun_log") as job:
        assert job.wait(LAUNCH_TIMEOUT) == 0, f"msrun failed:\n{job.report()}"
    assert run_mindformer.main(run_args(sft_prefix, tmp_path / "single", 4)) == 0
    single, ranks = read_metrics(tmp_path / "single", 0), [read_metrics(parallel, rank) for rank in (0, 1)]
    assert len(single) == len(ranks[0]) == STEPS
    for one, zero, first in zip(single, *ranks):
        assert one["target_tokens"] == zero["target_tokens"] == first["target_tokens"]
        np.testing.assert_allclose([zero["lm_loss"], zero["grad_norm"]], [one["lm_loss"], one["grad_norm"]],
                                   rtol=2e-5)
        assert zero["loss"] == first["loss"]
