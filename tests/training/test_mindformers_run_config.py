"""MindFormers' own DeepSeek-V3 YAMLs (tests/data/mindformers/, sources in their headers) at run level.

They load as published and give RunSettings, a ParallelConfig and the one start-up notice of keys with no
effect here; a key outside MindFormers' vocabulary fails with "did you mean"; string blend weights, MindFormers'
warmup_ratio arithmetic and the worker clamp behave as MindFormers' trainer does. Expected values are read from
the YAML text itself (yaml.safe_load, independently of the loader) or written out by hand from MindFormers'
sources (mindformers/core/lr/lr_schedule.py, mindformers/trainer/base_trainer.py).
"""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import PROJECT_ROOT, random_documents, write_dataset
from mindpretrain.config import load_config
from mindpretrain.data.dataset_builder import build_gpt_datasets, parse_blend
from mindpretrain.mindformers_keys import HONOURED, check_run_config, fate, no_effect_notice
from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.training.launch import log_no_effect_notice
from mindpretrain.training.lr_schedule import ConstantWarmUpLR, CosineWithWarmUpLR, build_lr_schedule
from mindpretrain.training.settings import RunSettings
from mindpretrain.validation import ConfigError

import mindpretrain.training  # noqa: F401  (registers the LR schedules)

DATA = PROJECT_ROOT / "tests" / "data" / "mindformers"
YAMLS = ("pretrain_deepseek3_671b.yaml", "finetune_deepseek3_671b.yaml", "pretrain_deepseek3_1b_guide.yaml")


def raw(name):
    with open(DATA / name, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.mark.parametrize("name", YAMLS)
def test_published_yaml_gives_settings_and_layout(name):
    published = raw(name)
    run_config = load_config(str(DATA / name))
    settings = RunSettings.from_config(run_config)
    callbacks = {callback["type"]: callback for callback in published["callbacks"]}
    assert settings.micro_batch_size == published["runner_config"]["batch_size"]
    assert settings.epochs == published["runner_config"]["epochs"]
    assert settings.log_interval == callbacks["MFLossMonitor"]["per_print_times"]
    assert settings.save_steps == callbacks["CheckpointMonitor"]["save_checkpoint_steps"]
    assert settings.keep_last == callbacks["CheckpointMonitor"]["keep_checkpoint_max"]
    assert settings.max_grad_norm == 1.0          # use_clip_grad: True, MFTrainOneStepCell's default norm
    assert settings.seq_length == published["model"]["model_config"]["seq_length"] == 4096
    assert settings.optimizer == published["optimizer"]
    layout = ParallelConfig.from_run_config(run_config)
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "micro_batch_num"):
        assert getattr(layout, key) == published["parallel_config"][key]
    assert layout.optimizer_shard is published["parallel"]["enable_parallel_optimizer"]
    assert settings.no_effect_keys and all(fate(key) not in (None, HONOURED) for key in settings.no_effect_keys)


def test_guide_yaml_keeps_its_optimizer_shard_size():
    layout = ParallelConfig.from_run_config(load_config(str(DATA / "pretrain_deepseek3_1b_guide.yaml")))
    assert layout.optimizer_weight_shard_size == 8
    assert layout.parallel_optimizer_context == {"optimizer_weight_shard_size": 8}
    assert layout.device_num == 8
    # handed to MindSpore's auto-parallel context on Ascend; the 671B YAML sets no size, so nothing is passed
    from mindpretrain.parallel.plan import plan_parallel

    context = plan_parallel("Ascend", True, 8, 0, layout).context
    assert context["parallel_optimizer_config"] == {"optimizer_weight_shard_size": 8}
    published = ParallelConfig.from_run_config(load_config(str(DATA / "pretrain_deepseek3_671b.yaml")))
    assert "parallel_optimizer_config" not in plan_parallel("Ascend", True, published.device_num, 0,
                                                            published).context


def test_671b_notice_lists_exactly_its_no_effect_keys(caplog):
    run_config = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"))
    settings = RunSettings.from_config(run_config)
    expected = [
        "load_ckpt_format", "src_strategy_path_or_dir", "auto_trans_ckpt", "only_save_strategy", "trainer",
        "micro_batch_interleave_num", "profile", "profile_start_step", "profile_stop_step", "init_start_profile",
        "profile_communication", "profile_memory", "context.ascend_config.parallel_speed_up_json_path",
        "parallel.parallel_mode", "parallel.gradients_mean", "parallel.enable_alltoall", "parallel.full_batch",
        "parallel.dataset_strategy", "parallel.search_mode", "parallel.strategy_ckpt_config",
        "parallel.parallel_optimizer_config.gradient_accumulation_shard",
        "parallel.parallel_optimizer_config.parallel_optimizer_threshold",
        "parallel_config.gradient_aggregation_group", "runner_config.sink_mode", "runner_config.sink_size",
        "train_dataset.input_columns", "train_dataset.construct_args_key", "train_dataset.python_multiprocessing",
        "train_dataset.drop_remainder", "train_dataset.repeat", "train_dataset.numa_enable",
        "train_dataset.prefetch_size", "train_dataset_task.type", "train_dataset_task.dataset_config",
        "recompute_config.parallel_optimizer_comm_recompute", "recompute_config.mp_comm_recompute",
        "recompute_config.recompute_slice_activation", "model.arch.auto_register",
        "train_dataset.data_loader.config.num_dataset_builder_threads", "callbacks.CheckpointMonitor.prefix",
        "callbacks.CheckpointMonitor.integrated_save", "callbacks.CheckpointMonitor.async_save"]
    assert list(settings.no_effect_keys) == expected

    class ModelConfig:   # the model config's own list joins the line once, duplicates dropped
        no_effect_keys = ("model.model_config.use_fused_rope", "trainer")

    with caplog.at_level(logging.INFO, logger="mindpretrain"):
        notice = log_no_effect_notice(settings, ModelConfig(), rank=0)
        log_no_effect_notice(settings, ModelConfig(), rank=1)
    assert notice == "no effect here: " + ", ".join(expected + ["model.model_config.use_fused_rope"])
    assert [record.getMessage() for record in caplog.records].count(notice) == 1


@pytest.mark.parametrize("override, suggestion", [
    ("+runner_config.batch_sise=2", "did you mean batch_size"),
    ("+seeed=3", "did you mean seed"),
    ("+parallel.enable_parallel_optimiser=True", "did you mean enable_parallel_optimizer"),
    ("+callbacks.2.save_checkpoint_step=10", "did you mean save_checkpoint_steps"),
    ("+lr_schedule.warmup_ration=0.1", "did you mean warmup_ratio"),
])
def test_a_typo_fails_with_did_you_mean(override, suggestion):
    run_config = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"), [override])
    with pytest.raises(ConfigError, match=suggestion):
        RunSettings.from_config(run_config)
    with pytest.raises(ConfigError, match=suggestion):
        check_run_config(run_config)


def test_an_unknown_callback_type_fails_with_did_you_mean():
    run_config = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"), ["callbacks.0.type=MFLossMonitr"])
    with pytest.raises(ConfigError, match="did you mean MFLossMonitor"):
        check_run_config(run_config)


def test_tolerated_top_level_sections_are_accepted():
    run_config = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"),
                             ["+metric.type=PerplexityMetric", "+eval_callbacks=[{type: EvalCallBack}]",
                              "+do_eval=False"])
    keys = check_run_config(run_config)
    assert {"metric", "eval_callbacks", "do_eval", "trainer"} <= set(keys)


def test_no_effect_keys_do_not_reach_the_optimizer():
    run_config = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"), ["+optimizer.swap=True"])
    settings = RunSettings.from_config(run_config)
    assert "optimizer.swap" in settings.no_effect_keys and "swap" not in settings.optimizer


def test_clip_grad_follows_mindformers_default():
    base = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"))
    del base["runner_wrapper"]["use_clip_grad"]          # MFTrainOneStepCell: use_clip_grad defaults to False
    assert RunSettings.from_config(base).max_grad_norm is None
    clipped = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"), ["+runner_wrapper.max_grad_norm=0.5"])
    assert RunSettings.from_config(clipped).max_grad_norm == 0.5
    other = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"), ["runner_wrapper.type=TrainOneStepWithLoss"])
    with pytest.raises(ConfigError, match="runner_wrapper.type"):
        RunSettings.from_config(other)


# -- data_path weights as MindFormers writes them --------------------------------------------------
def test_string_weights_parse_as_numbers():
    assert parse_blend(["1", "./dataset"]) == (["./dataset"], [1.0])
    assert parse_blend(["0.3", "a", 0.7, "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ConfigError, match="not a number"):
        parse_blend(["one", "./dataset"])


def test_string_weights_select_the_same_samples(tmp_path):
    first = write_dataset(tmp_path / "first", random_documents(1, 50, vocab=500, allow_empty=False))
    second = write_dataset(tmp_path / "second", random_documents(2, 50, vocab=500, allow_empty=False))

    def samples(data_path):
        section = {"seq_length": 16, "random_seed": 1234, "split": "1, 0, 0", "data_path": data_path,
                   "path_to_cache": None}
        train = build_gpt_datasets(section, [40, 0, 0])[0]
        return np.stack([train[index]["input_ids"] for index in range(len(train))])

    assert np.array_equal(samples(["1", first]), samples([1, first]))
    assert np.array_equal(samples(["0.3", first, "0.7", second]), samples([0.3, first, 0.7, second]))


# -- warmup_ratio: MindFormers' create_lr_scheduler ------------------------------------------------
def test_warmup_ratio_is_a_truncated_fraction_of_the_run():
    # MindFormers: warmup_steps = int(total_steps * warmup_ratio) with total_steps = epochs x dataset size,
    # the length of the run, whatever lr_schedule.total_steps says; int() truncates 28.999999999999996 to 28.
    schedule = build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 1.0, "warmup_ratio": 0.29,
                                  "total_steps": -1}, 100)
    assert schedule.warmup_steps == 28
    assert schedule(27) == pytest.approx(27 / 28) and schedule(28) == 1.0
    explicit = build_lr_schedule({"type": "CosineWithWarmUpLR", "learning_rate": 1.0, "lr_end": 0.0,
                                  "warmup_ratio": 0.1, "total_steps": 400}, 200)
    assert explicit.warmup_steps == 20 and explicit.total_steps == 400
    assert explicit(20) == 1.0 and explicit(210) == pytest.approx(0.5)   # cosine midpoint of 400 - 20 steps


def test_warmup_ratio_takes_precedence_over_warmup_steps():
    schedule = ConstantWarmUpLR(learning_rate=1.0, warmup_steps=50, warmup_ratio=0.02)
    schedule.set_total_steps(5000)
    assert schedule.warmup_steps == 100


def test_671b_warmup_ratio_over_its_run():
    run_config = load_config(str(DATA / "pretrain_deepseek3_671b.yaml"))
    schedule = build_lr_schedule(run_config.lr_schedule, 2500)    # e.g. 2 epochs of 1250 steps
    assert schedule.warmup_steps == 50 and schedule(50) == pytest.approx(2.2e-4)
    assert isinstance(schedule, ConstantWarmUpLR) and not isinstance(schedule, CosineWithWarmUpLR)


# -- num_parallel_workers on a small host ----------------------------------------------------------
@pytest.mark.parametrize("cores, expected", [(2, 2), (1, 1), (16, 8)])
def test_workers_are_clamped_to_the_cpu_count(monkeypatch, caplog, cores, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    run_config = load_config(str(DATA / "pretrain_deepseek3_1b_guide.yaml"))
    with caplog.at_level(logging.INFO, logger="mindpretrain"):
        settings = RunSettings.from_config(run_config)
    assert settings.num_parallel_workers == expected
    notices = [record.getMessage() for record in caplog.records if "num_parallel_workers" in record.getMessage()]
    assert notices == ([f"train_dataset.num_parallel_workers (8) lowered to {cores}, the CPU count of this host"]
                       if cores < 8 else [])


def test_bad_worker_count_is_refused():
    run_config = load_config(str(DATA / "pretrain_deepseek3_1b_guide.yaml"), ["train_dataset.num_parallel_workers=0"])
    with pytest.raises(ConfigError, match="num_parallel_workers"):
        RunSettings.from_config(run_config)


def test_minddataset_needs_its_files():
    """The published finetune YAML's MindRecord loader is read as it ships; its `./dataset` does not exist here."""
    from mindpretrain import registry
    import mindpretrain.data.loader  # noqa: F401  (registers the data loaders)

    section = dict(raw("finetune_deepseek3_671b.yaml")["train_dataset"]["data_loader"])
    with pytest.raises(ConfigError, match="dataset_dir .* must be a .mindrecord file or a directory"):
        registry.get("data_loader", section.pop("type"))(**section)


def test_plan_runs_on_the_published_671b_layout():
    completed = subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "plan.py"), "--config",
                                str(DATA / "pretrain_deepseek3_671b.yaml")], capture_output=True, text=True,
                               timeout=600, cwd=str(PROJECT_ROOT))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "pipeline" in completed.stdout.lower() and "FLOPs per token" in completed.stdout


@pytest.mark.parametrize("name", YAMLS)
def test_notice_joins_the_model_configs_keys_once(name):
    from mindpretrain import registry
    from mindpretrain.model_builder import build_model_config

    registry.import_register_path(str(PROJECT_ROOT / "research" / "deepseek3"))
    run_config = load_config(str(DATA / name))
    model_config = build_model_config(run_config)
    settings = RunSettings.from_config(run_config)
    keys = no_effect_notice(settings.no_effect_keys, model_config)[len("no effect here: "):].split(", ")
    assert len(keys) == len(set(keys))
    assert set(keys) == set(settings.no_effect_keys) | set(model_config.no_effect_keys)
    assert "model.model_config.n_kv_heads" in keys and "runner_config.sink_mode" in keys


def test_warmup_ratio_needs_a_run_length():
    steps = build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 1.0, "warmup_steps": 20,
                               "total_steps": -1}, None)
    assert steps.warmup_steps == 20 and steps(10) == 0.5
    with pytest.raises(ConfigError, match="warmup_ratio"):
        build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 1.0, "warmup_ratio": 0.1}, None)
