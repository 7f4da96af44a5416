"""GRPO in the planner: the rollout's KV cache and reference copy, the actor step's shape, tools/plan.py's section."""
import json

import pytest

from mindpretrain.planning.cost_model import TrainingSetup, build_plan
from mindpretrain.planning.rollout_memory import actor_step, decode_rows, rollout_memory, rollout_plan
from mindpretrain.rl.config import rl_config_from_run_config
from conftest import PROJECT_ROOT, load_tool

YAML_DIR = PROJECT_ROOT / "research" / "deepseek3" / "deepseek3_671b"
YAML_VERL = YAML_DIR / "grpo_deepseek3_671b_verl.yaml"
YAML_SLIME = YAML_DIR / "grpo_deepseek3_671b_slime.yaml"
YAML_PRETRAIN = YAML_DIR / "pretrain_deepseek3_671b.yaml"
YAML_TINY = PROJECT_ROOT / "configs" / "deepseek3" / "pretrain_deepseek3_tiny_cpu.yaml"
GIB = 1024 ** 3

TINY_GRPO = """base_config: {base}
run_mode: {run_mode}
parallel_config: {{data_parallel: 2, model_parallel: 2, pipeline_stage: 2, micro_batch_num: 2}}
rl_config:
  data: {{path: prompts.jsonl, max_prompt_length: 10}}
  rollout: {{n: 4, prompts_per_step: 6, max_response_length: 22}}
  actor: {{use_kl_loss: True, ppo_micro_batch_size_per_device: 2}}
"""


plan_tool = load_tool("plan")


@pytest.fixture
def tiny_grpo(tmp_path):
    """The tiny CPU model (3 decoder layers + 1 MTP, kv_lora_rank 32, rope dim 16, float32) on dp 2 x mp 2 x pp 2."""
    def write(run_mode="grpo"):
        path = tmp_path / f"tiny_{run_mode}.yaml"
        path.write_text(TINY_GRPO.format(base=YAML_TINY, run_mode=run_mode))
        return path
    return write


def test_kv_cache_is_latent_plus_rope_key_per_layer_split_by_stage_not_by_mp(tiny_grpo):
    run_config, model_config, parallel_config = plan_tool.load_run(str(tiny_grpo()))
    rl_config = rl_config_from_run_config(run_config, parallel_config.data_parallel)
    rows, positions = 6 * 4 // 2, 10 + 22                    # samples per device; prompt + response
    per_layer_token = (32 + 16) * 4                           # latent + rope key, float32
    assert (decode_rows(rl_config, 2), model_config.kv_lora_rank, model_config.qk_rope_head_dim) == (12, 32, 16)
    # stage 0 holds decoder layers 0-1; stage 1 decoder layer 2 and the MTP block, which decode does not run
    stage0 = rollout_memory(model_config, parallel_config, rl_config, 1000.0, layer_ids=(0, 1), fused_kernels=False)
    stage1 = rollout_memory(model_config, parallel_config, rl_config, 1000.0, layer_ids=(2, 3), fused_kernels=False)
    assert (stage0.decode_rows, stage0.positions) == (rows, positions)
    assert stage0.kv_cache_bytes == 2 * per_layer_token * rows * positions == 147456
    assert stage1.kv_cache_bytes == 1 * per_layer_token * rows * positions == 73728
    even = rollout_memory(model_config, parallel_config, rl_config, 1000.0, fused_kernels=False)
    assert even.kv_cache_bytes == 1.5 * per_layer_token * rows * positions       # 3 layers over 2 stages
    # the reference copy: the device's weights again, in the compute dtype (float32 here: same bytes)
    assert stage0.reference_bytes == 1000.0
    assert stage0.total == pytest.approx(1000.0 + 1000.0 + 147456 + stage0.decode_activation_bytes)


def test_decode_rows_follow_decode_batch_size_and_dynamic_sampling(tiny_grpo):
    run_config, _, parallel_config = plan_tool.load_run(str(tiny_grpo()))
    run_config["rl_config"]["rollout"]["decode_batch_size"] = 5
    assert decode_rows(rl_config_from_run_config(run_config, 2), 2) == 5
    del run_config["rl_config"]["rollout"]["decode_batch_size"]
    run_config["rl_config"]["dynamic_sampling"] = {"enable": True, "over_sampling_batch_size": 10}
    assert decode_rows(rl_config_from_run_config(run_config, 2), 2) == 10 * 4 // 2
    run_config["rl_config"]["actor"]["use_kl_loss"] = False
    _, model_config, _ = plan_tool.load_run(str(tiny_grpo()))
    no_kl = rollout_memory(model_config, parallel_config, rl_config_from_run_config(run_config, 2), 1000.0)
    assert no_kl.reference_bytes == 0.0


def test_actor_step_shape_and_the_plan_built_at_it(tiny_grpo):
    run_config, model_config, parallel_config = plan_tool.load_run(str(tiny_grpo()))
    rl_config = rl_config_from_run_config(run_config, 2)
    step = actor_step(rl_config, 2)
    assert (step.seq_length, step.micro_batch_size, step.micro_batches_per_update) == (32, 2, 6)
    plan = build_plan(model_config, parallel_config, TrainingSetup(micro_batch_size=2, seq_length=32,
                                                                   fused_kernels=False))
    rollout = rollout_plan(plan, rl_config)
    for stage, memory in zip(rollout.stages, plan.stages):
        assert stage.weight_bytes == memory.weights
        assert stage.training_state_bytes == memory.gradients + memory.optimizer
    assert rollout.training_peaks[0] == plan.stages[0].total + rollout.stages[0].reference_bytes
    assert rollout.peak == max(max(t, s.total) for t, s in zip(rollout.training_peaks, rollout.stages))


@pytest.mark.parametrize("yaml_path, rows, positions, seq", [(YAML_VERL, 64, 4096, 4096),
                                                             (YAML_SLIME, 32, 34816, 34816)])
def test_671b_grpo_recipes_plan_with_a_rollout_section(yaml_path, rows, positions, seq, capsys):
    assert plan_tool.main(["--config", str(yaml_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "rollout (GRPO)" in out and f"decode: {rows} rows x {positions} positions" in out
    assert f"step: micro batch 1 x seq {seq}," in out
    assert "peak per device (max of both phases)" in out and "-> fits" in out.split("rollout (GRPO)")[1]


def test_671b_json_rollout_numbers_match_a_hand_count(capsys):
    assert plan_tool.main(["--config", str(YAML_VERL), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rollout = report["rollout"]
    assert rollout["actor_step"] == {"seq_length": 4096, "micro_batch_size": 1, "micro_batches_per_update": 512}
    assert report["setup"]["seq_length"] == 4096 and report["setup"]["micro_batch_size"] == 1
    assert (rollout["decode_rows"], rollout["positions"]) == (64, 4096)
    worst = rollout["stages"][rollout["worst_stage"]]
    layers = len([layer for layer in report["placement"]["stages"][rollout["worst_stage"]]["layers"] if layer < 61])
    assert layers == 4 and worst["cached_layers"] == 4
    assert rollout["kv_cache_bytes"] == 4 * (512 + 64) * 2 * 64 * 4096         # bf16 latent + rope key
    stage = report["memory_bytes_per_device"][rollout["worst_stage"]]
    assert rollout["weight_bytes"] == stage["weights"]
    assert rollout["reference_bytes"] == stage["weights"] / 2                  # float32 weights, bf16 copy
    assert rollout["training_state_bytes"] == stage["gradients"] + stage["optimizer"]
    assert rollout["rollout_bytes"] == pytest.approx(sum(rollout[key] for key in (
        "weight_bytes", "training_state_bytes", "reference_bytes", "kv_cache_bytes", "decode_activation_bytes")))
    assert rollout["peak_bytes"] == max(max(s["total"], s["training_peak"]) for s in rollout["stages"])
    assert rollout["fits"] and rollout["peak_bytes"] <= rollout["device_memory_bytes"] == 58 * GIB


def test_rollout_that_does_not_fit_names_the_largest_decode_batch_that_does(capsys):
    args = ["--config", str(YAML_VERL), "--rl_config.rollout.decode_batch_size=512"]
    assert plan_tool.main(args + ["--check"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out.split("rollout (GRPO)")[1]
    assert plan_tool.main(args + ["--json"]) == 0
    fitting = json.loads(capsys.readouterr().out)["rollout"]["fitting_decode_batch_size"]
    assert 64 < fitting < 512
    for rows, fits in ((fitting, True), (fitting + 1, False)):
        assert plan_tool.main(["--config", str(YAML_VERL), f"--rl_config.rollout.decode_batch_size={rows}",
                               "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["rollout"]["fits"] is fits


def test_inconsistent_rl_config_exits_2_naming_the_key(capsys):
    code = plan_tool.main(["--config", str(YAML_VERL), "--rl_config.actor.clip_ratio_c=0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rl_config.actor.clip_ratio_c (0.5) must be null (no dual clip) or > 1" in err
    assert "Traceback" not in err


def test_run_mode_flag_switches_grpo_on_and_needs_rl_config(tiny_grpo, capsys):
    path = str(tiny_grpo(run_mode="train"))
    assert plan_tool.main(["--config", path]) == 0
    assert "rollout (GRPO)" not in capsys.readouterr().out
    assert plan_tool.main(["--config", path, "--run_mode", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "rollout (GRPO)" in out and "step: micro batch 2 x seq 32," in out
    assert plan_tool.main(["--config", str(YAML_PRETRAIN), "--run_mode", "grpo"]) == 2
    assert "rl_config (None) must be set for run_mode grpo" in capsys.readouterr().err


def test_non_grpo_yaml_has_no_rollout_section(capsys):
    assert plan_tool.main(["--config", str(YAML_PRETRAIN)]) == 0
    out = capsys.readouterr().out
    assert "rollout" not in out and "step: micro batch 1 x seq 4096," in out
    assert plan_tool.main(["--config", str(YAML_PRETRAIN), "--json"]) == 0
    assert "rollout" not in json.loads(capsys.readouterr().out)
