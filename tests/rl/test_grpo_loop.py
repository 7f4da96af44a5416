"""The GRPO loop through `run_mindformer.py --run_mode grpo` on the arithmetic task's tiny model (fresh weights).

One 4-step run with a KL loss and two mini batches per step (so the reference and the old log-probs are computed)
saves at step 2; a second launch resumes that checkpoint and must reproduce steps 3-4 exactly (same rollouts,
rewards and updates). Dynamic sampling with a policy that never scores stops with the reason; a malformed
prompt line stops the run before the model is built, naming the file and line.
"""
import json
import shutil

import pytest

from conftest import PROJECT_ROOT

pytest.importorskip("mindspore")

CONFIG = PROJECT_ROOT / "configs" / "deepseek3" / "grpo_arithmetic_tiny_cpu.yaml"
METRIC_NAMES = ("critic/score/mean", "response_length/mean", "response_length/clip_ratio", "actor/pg_loss",
                "actor/kl_loss", "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm", "rollout/filtered_groups",
                "timing_s/gen", "timing_s/reward", "timing_s/ref", "timing_s/old_log_prob", "timing_s/update_actor",
                "timing_s/step", "perf/tokens_per_s_per_device")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from mindpretrain.rl import arithmetic_task

    folder = tmp_path_factory.mktemp("task")
    assert arithmetic_task.main(["--output", str(folder), "--prompts", "40", "--corpus", "10"]) == 0
    return folder


def grpo(task, output, *extra):
    import run_mindformer

    return run_mindformer.main([
        "--config", str(CONFIG), "--register_path", str(PROJECT_ROOT / "research" / "deepseek3"),
        "--run_mode", "grpo", "--output_dir", str(output), "--tokenizer", str(task / "tokenizer" / "tokenizer.json"),
        f"--rl_config.data.path={task / 'prompts.jsonl'}", "--runner_config.train_steps=4",
        "--rl_config.rollout.n=4", "--rl_config.rollout.prompts_per_step=4", "--rl_config.rollout.max_response_length=10",
        "--rl_config.actor.ppo_mini_batch_size=2", "--rl_config.actor.use_kl_loss=True",
        "--callbacks.1.save_checkpoint_steps=2", *extra])


def scored_grpo(task, output, *extra):
    """A run whose rewards vary from the first step (tests/grpo_graders.py), so the updates move the policy."""
    return grpo(task, output, "--rl_config.reward.grader=grpo_graders:digit_share", *extra)


def metrics(output):
    return [json.loads(line) for line in (output / "metrics" / "rank_0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    first = tmp_path_factory.mktemp("grpo")
    assert scored_grpo(task, first) == 0
    resumed = tmp_path_factory.mktemp("resumed")
    shutil.copytree(first / "checkpoint" / "step_00000002", resumed / "checkpoint" / "step_00000002")
    assert scored_grpo(task, resumed, "--resume_training", "True") == 0
    return metrics(first), metrics(resumed)


def test_every_step_reports_verl_metrics(runs):
    history, _ = runs
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    for row in history:
        assert all(name in row for name in METRIC_NAMES), sorted(set(METRIC_NAMES) - set(row))
        assert row["actor/updates"] == 2 and 0 < row["response_length/mean"] <= 10
        assert row["perf/total_num_tokens"] > 16 and row["timing_s/old_log_prob"] > 0 and row["timing_s/ref"] > 0
    # low_var_kl >= 0; the policy leaves the reference (its first update of step 1 sees KL 0, the second does not)
    assert all(row["actor/kl_loss"] > 0 for row in history) and history[-1]["consumed_prompts"] == 16
    assert len({row["critic/score/mean"] for row in history}) > 1


def test_resume_reproduces_steps_3_and_4_exactly(runs):
    history, resumed = runs
    assert [row["step"] for row in resumed] == [3, 4]
    for mine, theirs in zip(resumed, history[2:]):
        for key in ("critic/score/mean", "response_length/mean", "actor/pg_loss", "actor/kl_loss", "actor/grad_norm",
                    "actor/entropy", "rollout/example", "consumed_prompts"):
            assert mine[key] == theirs[key], key


def test_dynamic_sampling_stops_when_no_group_has_a_signal(task, tmp_path, capsys):
    # fresh weights answer nothing right: every group scores 0 everywhere and is filtered
    code = grpo(task, tmp_path, "--rl_config.dynamic_sampling.enable=True",
                "--rl_config.dynamic_sampling.max_num_gen_batches=2")
    assert code == 1
    assert "dynamic sampling: after 2 generation rounds" in capsys.readouterr().err


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_a_signal(task, tmp_path):
    code = grpo(task, tmp_path, "--rl_config.reward.grader=grpo_graders:odd_labels_only",
                "--rl_config.dynamic_sampling.enable=True", "--rl_config.dynamic_sampling.over_sampling_batch_size=8",
                "--runner_config.train_steps=2", "--rl_config.actor.use_kl_loss=False")
    assert code == 0
    rows = metrics(tmp_path)
    assert sum(row["rollout/filtered_groups"] for row in rows) > 0           # even-label groups were dropped
    assert all(int(row["rollout/example"]["label"]) % 2 == 1 for row in rows)
    assert rows[-1]["consumed_prompts"] == 8 * sum(row["rollout/gen_rounds"] for row in rows)   # over-sampled


def test_a_malformed_prompt_line_stops_before_the_model_is_built(task, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "label": "2"}\n{"prompt": "2+2=" "label": "4"}\n')
    code = grpo(task, tmp_path / "out", f"--rl_config.data.path={bad}")
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:2" in err
    assert "parallel mode" not in err              # setup_run (model build) never started


def test_non_finite_updates_stop_at_the_skip_limit(task, tmp_path, capsys):
    # rewards near float32's maximum without std normalisation: every gradient norm overflows and is skipped
    code = grpo(task, tmp_path, "--rl_config.reward.grader=grpo_graders:overflowing",
                "--rl_config.actor.norm_adv_by_std_in_grpo=False", "--runner_config.max_consecutive_nan_steps=2",
                "--rl_config.actor.ppo_mini_batch_size=4", "--rl_config.actor.use_kl_loss=False")
    assert code == 1
    assert "stopping: 2 consecutive GRPO updates had a non-finite loss" in capsys.readouterr().err
    assert [row["actor/updates"] for row in metrics(tmp_path)] == [0]      # step 1 skipped; step 2 hits the limit


def test_processor_is_not_called_a_no_effect_key_where_it_gives_the_tokenizer():
    from mindpretrain.config import load_config
    from mindpretrain.mindformers_keys import check_run_config

    config = load_config(str(CONFIG))
    assert config["run_mode"] == "grpo" and "processor" not in check_run_config(config)
    config["run_mode"] = "train"
    assert "processor" in check_run_config(config)
