"""What a user reads in the worker logs when a run cannot start: 2 CPU workers under msrun (through
scripts/msrun_launcher.sh) pointed at a data prefix that does not exist.

Each worker's log must hold our own log lines and the one `run_mindformer.py: error:` line naming the
missing file: no Python traceback and none of MindSpore's C++ [WARNING]/[INFO] lines (the launcher sets
GLOG_v=3 and sends MindSpore's own log to files). The launcher must report the failure with exit status 1 and
name the failed workers' logs and error lines on its console, without msrun's Python traceback.
One launch only: msrun tests are slow.
"""
import pytest

from msrun_helpers import MsrunJob, sort_log_lines, worker_log

pytest.importorskip("mindspore")

from conftest import PROJECT_ROOT  # noqa: E402

STANDIN = PROJECT_ROOT / "tests" / "standin_model"
WORKERS = 2
LAUNCH_TIMEOUT = 600   # seconds: a hang guard for a loaded machine, not a performance bound


def test_missing_data_file_gives_one_line_in_each_worker_log(tmp_path, monkeypatch):
    for name in ("GLOG_v", "GLOG_logtostderr", "GLOG_log_dir", "GLOG_stderrthreshold", "MINDPRETRAIN_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)  # the defaults are under test, not the caller's choice
    missing = tmp_path / "data" / "wiki_text_document"
    command = " ".join(["run_mindformer.py", "--config", str(STANDIN / "train.yaml"), "--register_path", str(STANDIN),
                        "--output_dir", str(tmp_path / "out"), "--model.model_config.vocab_size=256",
                        f"--train_dataset.data_loader.config.data_path=[{missing}]"])
    with MsrunJob(command, WORKERS, tmp_path / "msrun_log") as job:
        code = job.wait(LAUNCH_TIMEOUT)
        logs = [worker_log(job, rank) for rank in range(WORKERS)]
        report, console = job.report(), job.output
    assert code == 1, report
    # the launcher's console names the failed workers' logs and their error line, without msrun's traceback
    assert "Traceback" not in console, console
    assert "msrun_launcher.sh: error: a worker failed" in console, console
    expected = f"run_mindformer.py: error: {missing}.idx: file not found"
    assert any(line.startswith("msrun_launcher.sh: worker_") and expected in line for line in console.splitlines()), \
        console
    for rank, log in enumerate(logs):
        errors, foreign = sort_log_lines(log)
        assert errors == [f"run_mindformer.py: error: {missing}.idx: file not found (data prefix '{missing}')"], \
            f"worker {rank}:\n{log}"
        assert foreign == [] and "Traceback" not in log and "[WARNING]" not in log, f"worker {rank}:\n{log}"
        assert f"rank {rank}/{WORKERS} on CPU, parallel mode data_parallel" in log  # it did start and reach the data
    assert (tmp_path / "msrun_log" / "mindspore").is_dir()  # where MindSpore's own log went
