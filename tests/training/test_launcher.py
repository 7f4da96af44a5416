"""scripts/msrun_launcher.sh argument forms, run_mindformer.py's config resolution end to end, the
parallel-mode decision (pure) and the LR schedules."""
import math
import os
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, random_documents, write_dataset

if str(PROJECT_ROOT) not in sys.path:  # run_mindformer.py lives at the repo root
    sys.path.insert(0, str(PROJECT_ROOT))

from mindpretrain.validation import ConfigError
from mindpretrain.parallel.plan import (DATA_PARALLEL, SEMI_AUTO_PARALLEL, STAND_ALONE, PipelineWrapping,
                                        pipeline_wrapping, plan_parallel)
from mindpretrain.training.lr_schedule import ConstantWarmUpLR, CosineWithWarmUpLR, LinearWithWarmUpLR

LAUNCHER = PROJECT_ROOT / "scripts" / "msrun_launcher.sh"


def dry_run(*args, env=None):
    env = dict(os.environ, MSRUN_LAUNCHER_DRY_RUN="1", **(env or {}))
    result = subprocess.run(["bash", str(LAUNCHER), *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    return result.returncode, result.stdout, result.stderr


def command_line(stdout):
    line = stdout.splitlines()[0]
    assert line.startswith("msrun_launcher.sh: ")
    return line[len("msrun_launcher.sh: "):].split()


def test_single_argument_uses_mindformers_defaults():
    code, out, _ = dry_run("run_mindformer.py --config x.yaml")
    assert code == 0
    words = command_line(out)
    assert words[0].endswith("msrun")
    assert words[1:] == ["--worker_num=8", "--local_worker_num=8", "--master_addr=127.0.0.1", "--master_port=8118",
                         "--node_rank=0", "--log_dir=output/msrun_log", "--join=False", "--cluster_time_out=7200",
                         "run_mindformer.py", "--config", "x.yaml"]
    assert "output/msrun_log/worker_<rank>.log" in out


def test_short_form_sets_worker_count_on_one_node():
    code, out, _ = dry_run("run_mindformer.py --config x.yaml", "2")
    assert code == 0
    words = command_line(out)
    assert "--worker_num=2" in words and "--local_worker_num=2" in words and "--node_rank=0" in words


def test_full_multi_node_form():
    code, out, _ = dry_run("run_mindformer.py --use_parallel True", "16", "8", "192.168.1.10", "9123", "1",
                           "logs/run1", "True", "300")
    assert code == 0
    assert command_line(out)[1:10] == ["--worker_num=16", "--local_worker_num=8", "--master_addr=192.168.1.10",
                                       "--master_port=9123", "--node_rank=1", "--log_dir=logs/run1", "--join=True",
                                       "--cluster_time_out=300", "run_mindformer.py"]


def test_dry_run_flag_form():
    result = subprocess.run(["bash", str(LAUNCHER), "--dry-run", "run_mindformer.py", "4"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--worker_num=4" in result.stdout


@pytest.mark.parametrize("args, message", [
    ((), "expected"),
    (("run_mindformer.py", "0"), "WORKER_NUM (0) must be a positive integer"),
    (("run_mindformer.py", "2", "4"), "LOCAL_WORKER (4) must not exceed WORKER_NUM (2)"),
    (("run_mindformer.py", "8", "8", "127.0.0.1", "80"), "MASTER_PORT (80) must be an integer in [1024, 65535]"),
    (("run_mindformer.py", "16", "8", "127.0.0.1", "8118", "2"), "NODE_RANK (2) must be below the node count"),
    (("run_mindformer.py", "8", "8", "127.0.0.1", "8118", "0", "log", "maybe"), "JOIN (maybe) must be True or False"),
    (("run_mindformer.py", "8", "8", "127.0.0.1", "8118", "0", "log", "True", "soon"), "CLUSTER_TIME_OUT (soon)"),
    (("no_such_script.py --config x",), "script no_such_script.py (first word of the command) does not exist"),
    (("run_mindformer.py",) + ("1",) * 9, "got 10 arguments"),
])
def test_invalid_arguments_are_refused(args, message):
    code, out, err = dry_run(*args)
    assert code == 2 and message in err and out == ""


# --- run_mindformer.py config resolution, end to end ---------------------------------------------------------

def test_run_mindformer_inheritance_and_overrides_end_to_end(tmp_path):
    """A child YAML inheriting the stand-in run, CLI flags and --key=value overrides reach the trained run."""
    pytest.importorskip("mindspore")
    import yaml

    import run_mindformer
    from mindpretrain.training import checkpoint as ckpt

    prefix = write_dataset(tmp_path / "data", random_documents(3, 30, max_length=200, vocab=256, allow_empty=False))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({
        "base_config": str(PROJECT_ROOT / "tests" / "standin_model" / "train.yaml"),
        "runner_config": {"train_steps": 50, "batch_size": 1},
        "model": {"model_config": {"vocab_size": 256, "hidden_size": 8}},
    }))
    argv = ["--config", str(child), "--register_path", str(PROJECT_ROOT / "tests" / "standin_model"),
            "--output_dir", str(tmp_path / "out"), "--device_target", "CPU", "--context.mode=1",
            f"--train_dataset.data_loader.config.data_path=[{prefix}]", "--runner_config.train_steps", "2",
            "--lr_schedule.learning_rate=0.001"]
    args, config = run_mindformer.resolve_config(argv)
    assert config.runner_config.train_steps == 2 and config.runner_config.batch_size == 1  # CLI > child > base
    assert config.runner_config.gradient_accumulation_steps == 1                            # from the base
    assert config.context.device_target == "CPU" and config.output_dir == str(tmp_path / "out")
    assert run_mindformer.main(argv) == 0
    saved = ckpt.find_resumable(str(tmp_path / "out" / "checkpoint"))
    assert saved.endswith("step_00000002")
    stored = yaml.safe_load(open(os.path.join(saved, ckpt.CONFIG_FILE)))
    assert stored["lr_schedule"]["learning_rate"] == 0.001 and stored["model"]["model_config"]["hidden_size"] == 8
    with pytest.raises(SystemExit):
        run_mindformer.resolve_config(["--config", str(child), "--runner_config.train_stepz=3"])


# --- parallel mode decision ------------------------------------------------------------------------------------

class FakeParallelConfig:
    def __init__(self, dp=1, mp=1, pp=1, ep=1, optimizer_shard=False, micro_batch_num=1):
        self.data_parallel, self.model_parallel, self.pipeline_stage = dp, mp, pp
        self.micro_batch_num = micro_batch_num
        self.expert_parallel, self.optimizer_shard = ep, optimizer_shard
        self.parallel_optimizer_context = {}

    @property
    def device_num(self):
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    def to_dict(self):
        return vars(self)


def test_single_process_is_stand_alone():
    plan = plan_parallel("CPU", False, 1, 0)
    assert plan.mode == STAND_ALONE and plan.data_parallel == 1


def test_cpu_workers_form_a_data_parallel_group():
    plan = plan_parallel("CPU", True, 2, 1, FakeParallelConfig(dp=1))
    assert plan.mode == DATA_PARALLEL and (plan.data_parallel, plan.data_rank) == (2, 1)
    assert plan.context["parallel_mode"] == "data_parallel" and not plan.full_batch


def test_cpu_refuses_model_or_pipeline_parallel():
    with pytest.raises(ConfigError, match="must be 1 on CPU"):
        plan_parallel("CPU", True, 4, 0, FakeParallelConfig(dp=2, mp=2))


def test_ascend_switches_on_semi_auto_pipeline_and_optimizer_sharding():
    pc = FakeParallelConfig(dp=4, mp=2, pp=2, ep=4, optimizer_shard=True, micro_batch_num=8)
    plan = plan_parallel("Ascend", True, 16, 5, pc)
    assert plan.mode == SEMI_AUTO_PARALLEL and plan.apply_shard_strategies and plan.full_batch
    assert plan.context == {"parallel_mode": "semi_auto_parallel", "gradients_mean": False, "full_batch": True,
                            "device_num": 16, "pipeline_stages": 2, "enable_parallel_optimizer": True,
                            "enable_alltoall": True}
    assert plan.data_parallel == 1  # MindSpore inserts the gradient reduction itself
    assert plan.batch_size_factor == 4 * 8  # full batch: data_parallel x micro_batch_num samples per batch_size
    with pytest.raises(ConfigError, match="16 devices, but 8 workers"):
        plan_parallel("Ascend", True, 8, 0, pc)


def test_pipeline_wrapping_only_for_ascend_pipeline_runs():
    """Pipeline + PipelineGradReducer are chosen for semi-auto runs with pipeline_stage > 1 only,
    with micro_batch_num from parallel_config (the wrapped cell itself: tests/training/test_train_pipeline.py)."""
    pc = FakeParallelConfig(dp=4, mp=2, pp=2, ep=4, optimizer_shard=True, micro_batch_num=8)
    wrapping = pipeline_wrapping(plan_parallel("Ascend", True, 16, 5, pc), pc)
    assert wrapping == PipelineWrapping(stages=2, micro_batch_num=8, optimizer_shard=True)
    assert (wrapping.wrapper, wrapping.grad_reducer) == ("mindspore.parallel.nn.Pipeline",
                                                   "mindspore.parallel.nn.PipelineGradReducer")
    no_pipeline = FakeParallelConfig(dp=8, mp=2, micro_batch_num=8)
    assert pipeline_wrapping(plan_parallel("Ascend", True, 16, 0, no_pipeline), no_pipeline) is None
    assert pipeline_wrapping(plan_parallel("CPU", True, 2, 0, FakeParallelConfig()), None) is None
    assert pipeline_wrapping(plan_parallel("CPU", False, 1, 0)) is None
    too_few = FakeParallelConfig(dp=1, mp=1, pp=4, micro_batch_num=2)
    with pytest.raises(ConfigError, match=r"micro_batch_num \(2\) must be at least pipeline_stage \(4\)"):
        pipeline_wrapping(plan_parallel("Ascend", True, 4, 0, too_few), too_few)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps \(2\) must be 1 with pipeline_stage > 1"):
        pipeline_wrapping(plan_parallel("Ascend", True, 16, 0, pc), pc, accumulation_steps=2)


def test_several_workers_without_use_parallel_is_an_error():
    with pytest.raises(ConfigError, match="use_parallel"):
        plan_parallel("CPU", False, 2, 0)


# --- LR schedules --------------------------------------------------------------------------------------------

def test_constant_warmup():
    schedule = ConstantWarmUpLR(learning_rate=1.0, warmup_steps=4)
    assert [schedule(step) for step in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_with_warmup_reaches_lr_end():
    schedule = CosineWithWarmUpLR(learning_rate=1.0, lr_end=0.1, warmup_ratio=0.1, total_steps=100)
    assert schedule.warmup_steps == 10 and schedule(5) == 0.5 and schedule(10) == 1.0
    assert schedule(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(100) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)


def test_linear_with_warmup():
    schedule = LinearWithWarmUpLR(learning_rate=2.0, warmup_steps=2, total_steps=6)
    assert [schedule(step) for step in range(7)] == [0.0, 1.0, 2.0, 1.5, 1.0, 0.5, 0.0]


def test_schedule_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="unknown keys"):
        ConstantWarmUpLR(learning_rate=1.0, warmup_step=3)


@pytest.mark.parametrize("name, devices", [("pretrain_deepseek3_1b.yaml", 8), ("pretrain_deepseek3_671b.yaml", 1024)])
def test_ascend_yamls_resolve_to_a_semi_auto_plan(name, devices):
    """The shipped Ascend YAMLs load, their training sections validate and their layout plans (on paper)."""
    from mindpretrain.config import load_config
    from mindpretrain.parallel.parallel_config import ParallelConfig
    from mindpretrain.training.lr_schedule import build_lr_schedule
    from mindpretrain.training.settings import RunSettings

    config = load_config(str(PROJECT_ROOT / "research" / "deepseek3" / "deepseek3_671b" / name))
    settings = RunSettings.from_config(config)
    assert settings.seq_length == 4096 and settings.save_steps and settings.max_grad_norm == 1.0
    schedule = build_lr_schedule(config.lr_schedule, settings.train_steps)
    assert schedule(0) == 0.0 and schedule(schedule.warmup_steps) == pytest.approx(2.2e-4)
    pc = ParallelConfig.from_run_config(config)
    plan = plan_parallel("Ascend", True, devices, 0, pc)
    assert plan.mode == SEMI_AUTO_PARALLEL and plan.context["enable_parallel_optimizer"] is True
    assert plan.context["pipeline_stages"] == pc.pipeline_stage
    wrapping = pipeline_wrapping(plan, pc, settings.accumulation_steps)
    if pc.pipeline_stage > 1:
        assert (wrapping.stages, wrapping.micro_batch_num) == (pc.pipeline_stage, pc.micro_batch_num)
    else:
        assert wrapping is None




# --- what a failed run prints: one line for a user's mistake, a traceback for a bug -----------------------------

STANDIN = PROJECT_ROOT / "tests" / "standin_model"


def run_entry_point(tmp_path, *args, environ=None):
    """`python run_mindformer.py <stand-in run> args` in a fresh process: (exit code, stderr)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GLOG_", "MINDPRETRAIN_TRACE"))}
    env.update(environ or {})
    command = [sys.executable, str(PROJECT_ROOT / "run_mindformer.py"), "--config", str(STANDIN / "train.yaml"),
               "--register_path", str(STANDIN), "--output_dir", str(tmp_path / "out"), "--device_target", "CPU",
               "--model.model_config.vocab_size=256", *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def typo_yaml(tmp_path):
    """The stand-in run with MindFormers' `warmup_steps` misspelt in the LR schedule."""
    text = (STANDIN / "train.yaml").read_text()
    assert "  warmup_steps: 2\n" in text
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace("  warmup_steps: 2\n", "  warmup_stepz: 2\n"))
    return path


@pytest.mark.parametrize("case", ["missing data prefix", "typo key", "bad register path"])
def test_user_error_ends_the_run_with_one_line(tmp_path, case):
    """Exit 1 and a stderr of our own log lines plus one `run_mindformer.py: error:` line naming the cause."""
    pytest.importorskip("mindspore")
    from msrun_helpers import sort_log_lines

    missing = tmp_path / "no_such_corpus"
    data = f"--train_dataset.data_loader.config.data_path=[{missing}]"
    args, cause = {
        "missing data prefix": ((data,), f"{missing}.idx"),
        "typo key": (("--config", str(typo_yaml(tmp_path)), data), "warmup_stepz"),
        "bad register path": ((data, "--register_path", str(tmp_path / "plugins")), str(tmp_path / "plugins")),
    }[case]
    code, stderr = run_entry_point(tmp_path, *args)
    errors, foreign = sort_log_lines(stderr)
    assert code == 1, stderr
    assert "Traceback" not in stderr and foreign == [], stderr
    assert len(errors) == 1 and cause in errors[0], stderr
    assert stderr.rstrip("\n").splitlines()[-1] == errors[0]  # the last word is the cause


def test_a_bug_keeps_its_traceback(tmp_path):
    """An exception that is no user error (here a plugin that fails to import) is re-raised as it was."""
    pytest.importorskip("mindspore")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_plugin.py").write_text("raise RuntimeError('plugin bug 1234')\n")
    code, stderr = run_entry_point(tmp_path, "--register_path", str(plugins))
    assert code == 1 and "Traceback (most recent call last)" in stderr
    assert stderr.rstrip("\n").splitlines()[-1] == "RuntimeError: plugin bug 1234"
    assert "run_mindformer.py: error:" not in stderr


def test_traceback_of_user_errors_on_request(tmp_path):
    code, stderr = run_entry_point(tmp_path, "--register_path", str(tmp_path / "plugins"),
                                   environ={"MINDPRETRAIN_TRACEBACK": "1"})
    assert code == 1 and "Traceback (most recent call last)" in stderr
    assert stderr.rstrip("\n").splitlines()[-1].startswith("FileNotFoundError: --register_path")


def test_error_line_wording():
    import run_mindformer
    from mindpretrain.registry import RegistryError

    listed = ConfigError("checkpoint x does not fit:\n  a.weight: [2, 2]\n  b.weight: [3]\n")
    assert run_mindformer.error_line(listed, {}) == ("run_mindformer.py: error: checkpoint x does not fit: "
                                                     "a.weight: [2, 2]; b.weight: [3]")
    missing = FileNotFoundError(2, "No such file or directory", "/data/wiki.idx")
    assert run_mindformer.error_line(missing, {}) == "run_mindformer.py: error: No such file or directory: /data/wiki.idx"
    assert run_mindformer.error_line(RegistryError("no model named 'X'"), {}) == \
        "run_mindformer.py: error: no model named 'X'"
    assert run_mindformer.error_line(KeyError("x"), {}) is None and run_mindformer.error_line(OSError(28, "full"), {}) is None
    # msrun's scheduler runs the script too: its init() fails because workers did; the first line says which
    scheduler = RuntimeError("The total number of timed out node is 2.\n\n-----\n- C++ Call Stack:\n-----\nx.cc:554")
    assert run_mindformer.error_line(scheduler, {"MS_ROLE": "MS_SCHED"}) == \
        "run_mindformer.py: error: msrun scheduler: The total number of timed out node is 2."
    assert run_mindformer.error_line(scheduler, {"MS_ROLE": "MS_WORKER"}) is None


@pytest.mark.parametrize("user_level, expected", [(None, "3"), ("1", "1")])
def test_mindspore_log_level_defaults_to_errors_only(user_level, expected):
    """MindSpore itself reads the level run_mindformer.py leaves before importing it (GLOG_v kept when set)."""
    pytest.importorskip("mindspore")
    env = {key: value for key, value in os.environ.items() if not key.startswith("GLOG_")}
    if user_level is not None:
        env["GLOG_v"] = user_level
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); import run_mindformer; "
              "run_mindformer.quiet_mindspore_logs(os.environ); import mindspore.log; print(mindspore.log.get_level())")
    result = subprocess.run([sys.executable, "-c", script, str(PROJECT_ROOT)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def launcher_environment(tmp_path, **glog):
    """The GLOG_* environment msrun would get from the launcher: a stand-in msrun prints what it received."""
    fake_bin = tmp_path / "venv" / "bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "msrun").write_text("#!/usr/bin/env bash\nenv | grep '^GLOG_' | sort\n")
    (fake_bin / "msrun").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("GLOG_")}
    env.update(glog, MINDPRETRAIN_VENV=str(tmp_path / "venv"))
    result = subprocess.run(["bash", str(LAUNCHER), "run_mindformer.py", "2", "2", "127.0.0.1", "8118", "0",
                             str(tmp_path / "logs"), "True"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if line.startswith("GLOG_"))


def test_launcher_quiets_mindspore_unless_the_user_chose(tmp_path):
    quiet = launcher_environment(tmp_path / "default")
    assert quiet == {"GLOG_v": "3", "GLOG_logtostderr": "0", "GLOG_stderrthreshold": "3",
                     "GLOG_log_dir": str(tmp_path / "default" / "logs" / "mindspore")}
    assert (tmp_path / "default" / "logs" / "mindspore").is_dir()
    assert launcher_environment(tmp_path / "chosen", GLOG_v="1") == {"GLOG_v": "1"}
    own_dir = str(tmp_path / "own")
    files = launcher_environment(tmp_path / "files", GLOG_v="2", GLOG_logtostderr="0", GLOG_log_dir=own_dir)
    assert files == {"GLOG_v": "2", "GLOG_logtostderr": "0", "GLOG_log_dir": own_dir, "GLOG_stderrthreshold": "2"}


def test_launcher_refuses_a_log_level_mindspore_would_refuse():
    code, out, err = dry_run("run_mindformer.py", "2", env={"GLOG_v": "debug"})
    assert code == 2 and out == "" and "GLOG_v (debug) must be a MindSpore log level" in err


def test_expert_parallel_picks_the_layout_that_splits_experts():
    """Data parallel with ep = dp: an ExpertLayout per rank (explicit dispatch); semi-auto with ep > 1: the dropless
    exchanged dispatch with whole experts, else (or with use_gmm False) the capacity dispatch, any other explicit
    dispatch refused; stand-alone: nothing."""
    import dataclasses
    import types

    from mindpretrain.parallel.parallel_config import ParallelConfig
    from mindpretrain.parallel.plan import expert_layout_for, semi_auto_moe_dispatch

    model_config = types.SimpleNamespace(n_routed_experts=8, moe_dispatch=None, moe_token_dispatcher_type=None)
    pc = ParallelConfig.from_dict(dict(data_parallel=2, expert_parallel=2))
    layout = expert_layout_for(plan_parallel("CPU", True, 2, 1, pc), pc, model_config, "CPU")
    assert (layout.experts_per_rank, layout.first_expert, layout.dispatcher) == (4, 4, "allgather")
    assert expert_layout_for(plan_parallel("CPU", False, 1, 0), pc, model_config, "CPU") is None
    semi = ParallelConfig.from_dict(dict(data_parallel=4, model_parallel=2, expert_parallel=4, pipeline_stage=2,
                                         micro_batch_num=2))
    plan = plan_parallel("Ascend", True, 16, 3, semi)
    assert expert_layout_for(plan, semi, model_config, "Ascend") is None
    assert semi_auto_moe_dispatch(plan, semi, model_config) == "capacity"       # experts split over mp (emp 2)
    with pytest.raises(ConfigError, match=r"moe_config.expert_model_parallel \(2\) must be 1 with moe_dispatch "
                                          r"grouped_matmul"):
        semi_auto_moe_dispatch(plan, semi, types.SimpleNamespace(n_routed_experts=8, moe_dispatch="grouped_matmul"))
    with pytest.raises(ConfigError, match=r"moe_dispatch \('dense'\) does not split the routed experts"):
        semi_auto_moe_dispatch(plan, semi, types.SimpleNamespace(n_routed_experts=8, moe_dispatch="dense"))
    whole = dataclasses.replace(semi, expert_model_parallel=1)              # whole experts: the dropless exchange
    assert semi_auto_moe_dispatch(plan, whole, model_config) == "grouped_matmul"
    assert semi_auto_moe_dispatch(plan, whole, types.SimpleNamespace(**vars(model_config), use_gmm=False)) == \
        "capacity"                                                             # MindFormers' use_gmm: False
    with pytest.raises(ConfigError, match=r"seq_length \(7\) must be divisible by parallel_config.model_parallel "
                                          r"\(2\) for the dropless expert exchange"):
        semi_auto_moe_dispatch(plan, whole, types.SimpleNamespace(**vars(model_config), seq_length=7))
    assert semi_auto_moe_dispatch(plan_parallel("CPU", True, 2, 1, pc), pc, model_config) is None
