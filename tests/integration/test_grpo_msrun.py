"""GRPO under msrun: 2 CPU workers, each sampling its own half of every step's prompts (whole groups).

The metrics are reduced over both ranks, so the two ranks report identical numbers; the policy stays identical
on both (the gathered parameter checksum after every step); each rank's prompts are its own share.
"""
import json
import os

import pytest

from conftest import PROJECT_ROOT
from msrun_helpers import MsrunJob

pytest.importorskip("mindspore")

CONFIG = PROJECT_ROOT / "configs" / "deepseek3" / "grpo_arithmetic_tiny_cpu.yaml"
LAUNCH_TIMEOUT = 900   # a hang guard for a loaded machine, not a performance bound


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mindpretrain.rl import arithmetic_task

    task = tmp_path_factory.mktemp("task")
    assert arithmetic_task.main(["--output", str(task), "--prompts", "40", "--corpus", "10"]) == 0
    output = tmp_path_factory.mktemp("grpo2")
    command = " ".join([
        "run_mindformer.py", "--config", str(CONFIG), "--register_path", str(PROJECT_ROOT / "research" / "deepseek3"),
        "--run_mode", "grpo", "--output_dir", str(output), "--tokenizer", str(task / "tokenizer" / "tokenizer.json"),
        f"--rl_config.data.path={task / 'prompts.jsonl'}", "--runner_config.train_steps=3",
        "--rl_config.rollout.n=4", "--rl_config.rollout.prompts_per_step=4", "--rl_config.rollout.max_response_length=10",
        "--rl_config.reward.grader=grpo_graders:digit_share", "--+runner_config.log_param_checksum=True"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "tests"), saved]))  # the grader
    try:
        with MsrunJob(command, 2, output / "msrun_log") as job:
            assert job.wait(LAUNCH_TIMEOUT) == 0, job.report()
            logs = job.logs()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    return [[json.loads(line) for line in (output / "metrics" / f"rank_{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)], logs


def test_both_ranks_report_the_global_step_and_keep_one_policy(run):
    (rank0, rank1), logs = run
    assert [row["step"] for row in rank0] == [1, 2, 3] and "8 per rank" in logs
    for first, second in zip(rank0, rank1):
        for key in ("critic/score/mean", "response_length/mean", "actor/pg_loss", "actor/grad_norm",
                    "perf/total_num_tokens", "param_checksum"):
            assert first[key] == second[key], key
        assert first["rollout/example"]["prompt"] != second["rollout/example"]["prompt"] or \
            first["rollout/example"]["response"] != second["rollout/example"]["response"]
    assert len({row["param_checksum"] for row in rank0}) == 3
