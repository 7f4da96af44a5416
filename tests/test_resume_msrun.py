"""Data parallelism for real: 2 CPU workers under msrun (through scripts/msrun_launcher.sh).

One uninterrupted 12-step run checks that both ranks hold bit-identical parameters and optimizer
state after every step, and that the rank-averaged gradients reproduce a single process training
on the same global batch. A second launch resumes from the step-6 checkpoint and must reproduce
steps 7-12 to the bit, on both ranks.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT, random_documents, write_dataset

if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

pytest.importorskip("mindspore")

STANDIN = PROJECT_ROOT / "tests" / "standin_model"
LAUNCHER = PROJECT_ROOT / "scripts" / "msrun_launcher.sh"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_args(data_prefix, output_dir, *extra):
    return ["--config", str(STANDIN / "train.yaml"), "--register_path", str(STANDIN), "--output_dir", str(output_dir),
            f"--train_dataset.data_loader.config.data_path=[{data_prefix}]", "--model.model_config.vocab_size=256",
            *extra]


def launch_two_workers(data_prefix, output_dir, *extra):
    command = " ".join(["run_mindformer.py", *run_args(data_prefix, output_dir, "--+runner_config.log_param_checksum=True",
                                                       *extra)])
    log_dir = output_dir / "msrun_log"
    result = subprocess.run(["bash", str(LAUNCHER), command, "2", "2", "127.0.0.1", str(free_port()), "0",
                             str(log_dir), "True", "120"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=300)
    logs = "".join((log_dir / f"worker_{rank}.log").read_text() for rank in (0, 1)
                   if (log_dir / f"worker_{rank}.log").exists())
    assert result.returncode == 0, f"msrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs[-4000:]}"
    return logs


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


def _worker_pid(marker, rank):
    """pid of the msrun worker of `rank` whose command line contains `marker` (Linux /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode()
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environment = dict(item.split("=", 1) for item in handle.read().decode(errors="replace").split("\0")
                                   if "=" in item)
        except OSError:
            continue
        if (marker in command and "run_mindformer.py" in command and environment.get("MS_ROLE") == "MS_WORKER"
                and environment.get("RANK_ID") == str(rank)):
            return int(entry)
    return None


def test_sigterm_to_one_worker_stops_both_after_the_same_step(data_prefix, tmp_path):
    """Only rank 1 is signalled; the stop flag travels with the step's all-reduce, so both ranks stop after
    the same step, rank 0 saves it, and msrun reports success."""
    import signal
    import time

    output = tmp_path / "sigterm"
    command = " ".join(["run_mindformer.py", *run_args(data_prefix, output, "--runner_config.train_steps=100000")])
    process = subprocess.Popen(["bash", str(LAUNCHER), command, "2", "2", "127.0.0.1", str(free_port()), "0",
                                str(output / "msrun_log"), "True", "120"], cwd=PROJECT_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = output / "metrics" / "rank_1.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.5)
        pid = _worker_pid(str(output), 1)
        assert pid is not None, "rank 1 worker not found"
        os.kill(pid, signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    last = [read_metrics(output, rank)[-1]["step"] for rank in (0, 1)]
    assert last[0] == last[1] < 100000
    from mindpretrain.training import checkpoint as ckpt

    newest = ckpt.find_resumable(str(output / "checkpoint"))
    assert newest.endswith(ckpt.step_dir_name(last[0]))
