"""The planner counts the capacity dispatch's buffers, and plans the dispatch the launcher would build.

Under semi-auto parallel with expert_parallel > 1 the launcher builds the capacity dispatch
(`mindpretrain.parallel.plan.semi_auto_moe_dispatch`); tools/plan.py must apply the same rule, and the cost model
must then count what that dispatch keeps per MoE layer: E*C expert rows instead of K per token, the gathered
outputs and two int32 index tensors (research/deepseek3/capacity_dispatch.py)."""
import json

import pytest
import yaml

from mindpretrain.config import load_config, parse_override_args
from mindpretrain.parallel.parallel_config import ParallelConfig
from mindpretrain.planning.cost_model import GIB, TrainingSetup, build_plan, model_facts
from mindpretrain.validation import ConfigError
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.planning import layer_activation_terms
from conftest import PROJECT_ROOT, load_tool

YAML_TINY = PROJECT_ROOT / "configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml"
plan_tool = load_tool("plan")


def tiny_model_config(**overrides):
    section = dict(load_config(str(YAML_TINY)).model.model_config)
    section.pop("type")
    return DeepseekV3Config(**{**section, "moe_capacity_factor": 1.5, **overrides})


def test_capacity_activations_exceed_block_sparse_by_exactly_the_counted_buffers():
    # H 64, I 32, E 8, K 2, fp32; n = 2 x 16 = 32 tokens, C = ceil(2 * 32 * 1.5 / 8) = 12: E*C = 96 rows, K*n = 64
    setup = TrainingSetup(micro_batch_size=2, seq_length=16, fused_kernels=True)
    parallel = ParallelConfig.from_dict(dict(data_parallel=1, model_parallel=1, expert_parallel=1))
    plans = {}
    for dispatch in ("block_sparse", "capacity"):
        config = tiny_model_config(moe_dispatch=dispatch)
        plans[dispatch] = build_plan(config, parallel, setup, facts=model_facts(config))
    moe_layers = [layer for layer in range(4) if tiny_model_config().is_moe_layer(layer)]
    assert moe_layers == [1, 2, 3]                           # two decoder layers and the MTP block
    # per MoE layer: 32 more expert rows, each with an input [H] and gate/up/silu/product [4 I] in fp32, and the
    # int32 indices: a token per slot (96) and a slot per assignment (64)
    per_layer = (96 - 64) * (64 + 4 * 32) * 4 + (96 + 64) * 4
    assert per_layer == 25_216
    capacity, block = plans["capacity"].stages[0], plans["block_sparse"].stages[0]
    assert capacity.activations - block.activations == pytest.approx(3 * per_layer, rel=1e-12)
    assert capacity.activations_without_recompute - block.activations_without_recompute == \
        pytest.approx(3 * per_layer, rel=1e-12)
    assert capacity.weights == block.weights                 # the dispatch changes activations only


def test_capacity_terms_by_name():
    config = tiny_model_config(moe_dispatch="capacity")
    parallel = ParallelConfig.from_dict(dict(data_parallel=1, model_parallel=1, expert_parallel=1))
    terms = {name: (elements, key) for name, elements, key in
             layer_activation_terms(config, parallel, 1, 16, True, tokens=32)}
    assert terms["dispatched tokens and routed outputs"] == ((96 * 64 + 64 * 64) / 32, "compute")
    assert terms["routed experts gate/up/silu/product"] == (96 / 32 * 4 * 32, "compute")
    assert terms["capacity dispatch slot and combine indices"] == (5.0, "int32")
    dense = {name for name, _, _ in layer_activation_terms(config, parallel, 0, 16, True, tokens=32)}
    assert "capacity dispatch slot and combine indices" not in dense


# ---------------------------------------------------------------------------- the launcher's dispatch rule
def semi_auto_yaml(tmp_path, device="Ascend", use_parallel=True, **parallel):
    run = yaml.safe_load(YAML_TINY.read_text())
    run["context"]["device_target"] = device
    run["use_parallel"] = use_parallel
    run["parallel_config"].update({**dict(data_parallel=2, model_parallel=1, expert_parallel=2), **parallel})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def test_plan_tool_plans_the_launcher_dispatch_under_semi_auto_parallel_with_expert_parallel(tmp_path):
    _, config, _ = plan_tool.load_run(semi_auto_yaml(tmp_path))
    assert config.moe_dispatch == "grouped_matmul"           # whole experts (mp 1): the dropless exchange
    _, config, _ = plan_tool.load_run(semi_auto_yaml(tmp_path), parse_override_args(
        ["--+model.model_config.moe_config.use_gmm=False"]))
    assert config.moe_dispatch == "capacity"
    _, config, _ = plan_tool.load_run(semi_auto_yaml(tmp_path, expert_parallel=1))
    assert config.moe_dispatch is None                       # ep 1: the model's own choice
    _, config, _ = plan_tool.load_run(semi_auto_yaml(tmp_path, device="CPU"))
    assert config.moe_dispatch is None                       # CPU data parallel: no semi-auto parallel
    _, config, _ = plan_tool.load_run(semi_auto_yaml(tmp_path, use_parallel=False))
    assert config.moe_dispatch is None                       # stand-alone


def test_plan_tool_refuses_a_dispatch_the_launcher_refuses(tmp_path, capsys):
    overrides = parse_override_args(["--+model.model_config.moe_dispatch=block_sparse"])
    with pytest.raises(ConfigError, match=r"moe_dispatch \('block_sparse'\) does not split the routed experts"):
        plan_tool.load_run(semi_auto_yaml(tmp_path), overrides)
    refused = ["--config", semi_auto_yaml(tmp_path), "--+model.model_config.moe_dispatch=block_sparse"]
    assert plan_tool.main(refused) == 2
    assert "invalid configuration: moe_dispatch ('block_sparse')" in capsys.readouterr().err


@pytest.mark.parametrize("path, dispatch, budget_gib", [
    ("research/deepseek3/deepseek3_671b/pretrain_deepseek3_671b.yaml", "capacity", 58),   # experts split by mp 4
    ("tests/data/mindformers/pretrain_deepseek3_671b.yaml", "grouped_matmul", 55),        # use_gmm, expert tp 1
])
def test_the_671b_yamls_are_planned_with_their_expert_parallel_dispatch_and_fit(path, dispatch, budget_gib, capsys):
    """MindFormers' published YAML (use_gmm: True, moe_config.expert_model_parallel: 1) is planned with the dropless
    exchange, whose tokens are split over dp x mp (not only dp, as the capacity dispatch's): it fits its own
    max_device_memory (55GB) where the capacity dispatch planned 55.68 GiB."""
    _, config, parallel = plan_tool.load_run(str(PROJECT_ROOT / path))
    assert parallel.expert_parallel == 8 and config.moe_dispatch == dispatch
    assert plan_tool.main(["--config", str(PROJECT_ROOT / path), "--json", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["device_memory_bytes"] == budget_gib * GIB
    assert report["worst_stage_bytes"] < 0.75 * budget_gib * GIB if dispatch == "grouped_matmul" else True


def test_exchanged_dispatch_terms_by_name():
    config = tiny_model_config(moe_dispatch="grouped_matmul")
    parallel = ParallelConfig.from_dict(dict(data_parallel=4, model_parallel=2, expert_parallel=4,
                                             expert_model_parallel=1))
    terms = {name: (elements, key) for name, elements, key in
             layer_activation_terms(config, parallel, 1, 16, True, tokens=32)}
    # K = 2, H = 64, I = 32, split over mp = 2 (each device of a dp shard takes half its tokens)
    assert terms["exchanged token rows and routed outputs"] == (2 * 2 * 64 / 2, "compute")
    assert terms["routed experts gate/up/silu/product"] == (4 * 2 * 32 / 2, "compute")
    assert terms["exchange sort orders"] == (4 * 2 / 2, "int32")
    assert "capacity dispatch slot and combine indices" not in terms
