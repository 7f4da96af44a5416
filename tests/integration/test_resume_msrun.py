"""Data parallelism for real: 2 CPU workers under msrun (through scripts/msrun_launcher.sh).

One uninterrupted 12-step run checks that both ranks hold bit-identical parameters and optimizer
state after every step, and that the rank-averaged gradients reproduce a single process training
on the same global batch. A second launch resumes from the step-6 checkpoint and must reproduce
steps 7-12 to the bit, on both ranks. The launches go through tests/msrun_helpers.py, which picks the
scheduler port and kills every process of a launch when the test ends, passed or failed; the last two
tests check exactly that with scripts that only join the cluster or sleep.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT, random_documents, write_dataset
import msrun_helpers
from msrun_helpers import MsrunJob

if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

pytest.importorskip("mindspore")

STANDIN = PROJECT_ROOT / "tests" / "standin_model"
LAUNCH_TIMEOUT = 900   # seconds for one launch: a hang guard for a loaded machine, not a performance bound


def run_args(data_prefix, output_dir, *extra):
    return ["--config", str(STANDIN / "train.yaml"), "--register_path", str(STANDIN), "--output_dir", str(output_dir),
            f"--train_dataset.data_loader.config.data_path=[{data_prefix}]", "--model.model_config.vocab_size=256",
            *extra]


def launch_two_workers(data_prefix, output_dir, *extra):
    command = " ".join(["run_mindformer.py", *run_args(data_prefix, output_dir, "--+runner_config.log_param_checksum=True",
                                                       *extra)])
    with MsrunJob(command, 2, output_dir / "msrun_log") as job:
        code = job.wait(LAUNCH_TIMEOUT)
        assert code == 0, f"msrun failed:\n{job.report()}"
        return job.logs()


def read_metrics(output_dir, rank):
    path = output_dir / "metrics" / f"rank_{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_dataset(folder / "synthetic", random_documents(11, 60, max_length=300, vocab=256, allow_empty=False))


@pytest.fixture(scope="module")
def two_worker_run(data_prefix, tmp_path_factory):
    output = tmp_path_factory.mktemp("dp2")
    logs = launch_two_workers(data_prefix, output)
    return output, logs


def test_both_ranks_hold_identical_parameters_after_every_step(two_worker_run):
    output, logs = two_worker_run
    rank0, rank1 = read_metrics(output, 0), read_metrics(output, 1)
    assert [m["step"] for m in rank0] == [m["step"] for m in rank1] == list(range(1, 13))
    for first, second in zip(rank0, rank1):
        assert first["param_checksum"] == second["param_checksum"], first["step"]
        assert first["loss"] == second["loss"] and first["grad_norm"] == second["grad_norm"]
    assert len({m["param_checksum"] for m in rank0}) == 12  # and they do change every step
    assert "parallel mode data_parallel" in logs and "batch_size 2 x dp 2" in logs


def test_two_workers_match_one_process_on_the_same_global_batch(two_worker_run, data_prefix, tmp_path):
    """Averaging the ranks' gradients equals training on their union (4 samples) in one process."""
    import run_mindformer

    output, _ = two_worker_run
    assert run_mindformer.main(run_args(data_prefix, tmp_path, "--runner_config.batch_size=4",
                                        "--runner_config.train_steps=4")) == 0
    single = read_metrics(tmp_path, 0)
    parallel = read_metrics(output, 0)[:4]
    for one, two in zip(single, parallel):
        assert one["consumed_samples"] == two["consumed_samples"]
        np.testing.assert_allclose([one["loss"], one["grad_norm"]], [two["loss"], two["grad_norm"]], rtol=2e-5)


def test_resume_under_msrun_reproduces_steps_7_to_12_bit_exactly(two_worker_run, data_prefix, tmp_path):
    output, _ = two_worker_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint" / "step_00000006", resumed / "checkpoint" / "step_00000006")
    logs = launch_two_workers(data_prefix, resumed, "--resume_training", "True")
    assert "resumed from" in logs
    for rank in (0, 1):
        again = read_metrics(resumed, rank)
        reference = read_metrics(output, rank)[6:]
        assert [m["step"] for m in again] == list(range(7, 13))
        for mine, theirs in zip(again, reference):
            for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "param_checksum", "consumed_samples"):
                assert mine[key] == theirs[key], (rank, mine["step"], key)
    assert os.path.isdir(resumed / "checkpoint" / "step_00000012")


def test_float16_loss_scale_decisions_agree_across_ranks(data_prefix, tmp_path):
    """float16 compute with dynamic loss scaling from 2^24 (real overflows): an overflow on any rank
    reaches every rank through the gradient all-reduce, so both skip the same steps, run the same
    scale sequence and keep bit-identical parameters."""
    output = tmp_path / "fp16"
    logs = launch_two_workers(data_prefix, output, "--runner_config.train_steps=6",
                              "--+model.model_config.compute_dtype=float16",
                              "--+runner_wrapper.scale_sense.loss_scale_value=16777216",
                              "--+runner_wrapper.scale_sense.scale_window=2")
    rank0, rank1 = read_metrics(output, 0), read_metrics(output, 1)
    assert [m["loss_scale"] for m in rank0] == [m["loss_scale"] for m in rank1]
    assert rank0[0]["loss_scale"] == 2 ** 24 and rank0[0]["overflow"] and not all(m["skipped"] for m in rank0)
    for first, second in zip(rank0, rank1):
        assert (first["skipped"], first["param_checksum"]) == (second["skipped"], second["param_checksum"])
    assert "gradient overflow at loss scale" in logs


def test_sigterm_to_one_worker_stops_both_after_the_same_step(data_prefix, tmp_path):
    """Only rank 1 is signalled; the stop flag travels with the step's all-reduce, so both ranks stop after
    the same step, rank 0 saves it, and msrun reports success."""
    import signal

    output = tmp_path / "sigterm"
    command = " ".join(["run_mindformer.py", *run_args(data_prefix, output, "--runner_config.train_steps=100000")])
    metrics = output / "metrics" / "rank_1.jsonl"
    with MsrunJob(command, 2, output / "msrun_log") as job:
        job.wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, LAUNCH_TIMEOUT,
                       "three steps logged by rank 1")
        pid = job.worker_pid(1)
        assert pid is not None, "rank 1 worker not found"
        os.kill(pid, signal.SIGTERM)
        assert job.wait(LAUNCH_TIMEOUT) == 0, job.report()
    last = [read_metrics(output, rank)[-1]["step"] for rank in (0, 1)]
    assert last[0] == last[1] < 100000
    from mindpretrain.training import checkpoint as ckpt

    newest = ckpt.find_resumable(str(output / "checkpoint"))
    assert newest.endswith(ckpt.step_dir_name(last[0]))


# --- the launch helper itself ------------------------------------------------------------------------------

def test_leaving_the_launch_kills_every_worker_even_on_failure(tmp_path):
    """Workers run in sessions of their own (msrun uses setsid): they must still be gone after a failed test."""
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(3600)\n")
    with pytest.raises(RuntimeError, match="the test failed here"):
        with MsrunJob(str(sleeper), 2, tmp_path / "msrun_log") as job:
            job.wait_until(lambda: all(job.worker_pid(rank) for rank in (0, 1)), LAUNCH_TIMEOUT, "both workers")
            workers = [job.worker_pid(rank) for rank in (0, 1)]
            assert all(os.getsid(pid) == pid for pid in workers)   # not in the launcher's session
            raise RuntimeError("the test failed here")
    assert msrun_helpers.marked_pids(job.mark) == []


def test_a_taken_scheduler_port_is_replaced(tmp_path, monkeypatch):
    """The scheduler finds its port taken (as when another process binds it after the probe): the launch is
    started again on another port and succeeds."""
    import socket

    joiner = tmp_path / "joiner.py"
    joiner.write_text("import mindspore\nmindspore.set_device('CPU')\nfrom mindspore.communication import init\n"
                      "init()\n")
    with socket.socket() as taken:
        taken.bind((msrun_helpers.HOST, 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real_choice = msrun_helpers.free_master_port
        monkeypatch.setattr(msrun_helpers, "free_master_port",
                            lambda workers: ports.pop() if ports else real_choice(workers))
        with MsrunJob(str(joiner), 2, tmp_path / "msrun_log") as job:
            assert job.wait(LAUNCH_TIMEOUT) == 0, job.report()
            assert job.port != taken.getsockname()[1]
