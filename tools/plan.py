"""Pre-flight planner: will this run's layout divide and fit, before anyone books 128 nodes?

    python tools/plan.py --config research/deepseek3/deepseek3_671b/pretrain_deepseek3_671b.yaml \
        [--devices 1024] [--device-memory 64GiB] [--json] [--key.sub=value ...]

Loads the YAML as training does (`mindpretrain.config.load_config` with the same `--key=value`
overrides, the model config built through the registry after importing `--register_path`), validates
the parallel layout against the model and the device count (the same `ParallelConfig.validate` the
trainer runs), then prints per device: parameter counts, shard shapes per weight kind, memory for
weights/gradients/optimizer state/activations per pipeline stage, layer placement and bubble,
communication per step and FLOPs per token. When the worst stage does not fit `--device-memory` it
tries single changes in order of how little they disturb the run (optimizer sharding, selective then
full recompute, a balanced layer offset, splitting the vocabulary over model parallel, optimizer-state
offload, twice the pipeline stages) and then their combinations, and names the gentlest that fits.

For `run_mode: grpo` (in the YAML or `--run_mode grpo`) the `rl_config` section is read as the GRPO run
reads it, the training step is planned at the actor's shape (micro batches of
`actor.ppo_micro_batch_size_per_device` rows of max_prompt_length + max_response_length tokens), and a
"rollout (GRPO)" section adds the rollout phase: KV cache, reference copy, decode activations and the peak
of both phases (`mindpretrain/planning/rollout_memory.py` says what is counted); `--check` then judges that
peak.

Exit status: 0 (use `--check` to exit 1 when the plan does not fit), 2 for an invalid configuration.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mindpretrain import registry  # noqa: E402
from mindpretrain.config import load_config, parse_override_args  # noqa: E402
from mindpretrain.registry import RegistryError  # noqa: E402
from mindpretrain.validation import ConfigError  # noqa: E402
from mindpretrain.mindformers_keys import check_run_config  # noqa: E402
from mindpretrain.model_builder import build_model_config  # noqa: E402
from mindpretrain.model_spec import spec_for_config  # noqa: E402
from mindpretrain.parallel.layouts import kind_summary  # noqa: E402
from mindpretrain.parallel.parallel_config import ParallelConfig  # noqa: E402
from mindpretrain.parallel.plan import plan_parallel, semi_auto_moe_dispatch  # noqa: E402
from mindpretrain.planning.cost_model import (GIB, TrainingSetup, build_plan, model_facts,  # noqa: E402
                                              optimizer_factor)
from mindpretrain.planning.rollout_memory import (actor_step, format_rollout,  # noqa: E402
                                                  largest_fitting_decode_batch, rollout_plan, rollout_to_dict)
from mindpretrain.rl.config import rl_config_from_run_config  # noqa: E402

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_bytes(text):
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"--device-memory ({text!r}) must look like 64GiB, 64GB or 68719476736")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def device_memory_budget(run_config, option):
    """--device-memory, else the YAML's context.max_device_memory (MindSpore reads its "GB" as GiB), else 64GiB."""
    if option:
        return parse_bytes(option)
    configured = (run_config.get("context") or {}).get("max_device_memory")
    if configured:
        match = re.fullmatch(r"\s*([0-9.]+)\s*GB\s*", str(configured))
        if match:
            return float(match.group(1)) * GIB
        return parse_bytes(configured)
    return 64 * GIB


# ------------------------------------------------------------------------------------------ loading
def load_run(config_path, overrides=(), register_path=None):
    """(run config, model config, ParallelConfig) exactly as training builds them (no model weights)."""
    run_config = load_config(config_path, overrides)
    check_run_config(run_config)          # the same key vocabulary as training: typos fail with "did you mean"
    registry.import_register_path(register_path or os.path.join(ROOT, "research", "deepseek3"))
    model_config = build_model_config(run_config)
    parallel_config = ParallelConfig.from_run_config(run_config)
    use_launched_moe_dispatch(run_config, model_config, parallel_config)
    return run_config, model_config, parallel_config


def use_launched_moe_dispatch(run_config, model_config, parallel_config):
    """Set the MoE dispatch the launcher builds the model with (`semi_auto_moe_dispatch`: the dropless exchange
    or capacity under semi-auto parallel on Ascend with expert_parallel > 1), so the plan counts its buffers."""
    device = str((run_config.get("context") or {}).get("device_target") or "Ascend").upper()
    if device != "ASCEND":              # only semi-auto parallel, which needs Ascend, changes the dispatch
        return
    use_parallel = run_config.get("use_parallel")
    plan = plan_parallel(device, use_parallel, parallel_config.device_num if use_parallel else 1, 0,
                         parallel_config)
    dispatch = semi_auto_moe_dispatch(plan, parallel_config, model_config)
    if dispatch != getattr(model_config, "moe_dispatch", None):
        model_config.moe_dispatch = dispatch


def training_setup(run_config, model_config, args, rl_config=None, dp_size=1):
    """What the step costs besides model and layout; a GRPO run's step has the actor's shape (`rl_config`)."""
    runner = run_config.get("runner_config") or {}
    parallel = run_config.get("parallel") or {}
    optimizer_cfg = parallel.get("parallel_optimizer_config") or {}
    device_target = str(((run_config.get("context") or {}).get("device_target")) or "Ascend")
    fused = args.fused_kernels
    if fused is None:
        # Ascend runs fused kernels (flash attention, ...); CPU runs this repository's reference ops
        fused = device_target.upper() != "CPU"
    micro, seq = runner.get("batch_size") or 1, model_config.seq_length
    if rl_config is not None:
        step = actor_step(rl_config, dp_size)
        micro, seq = step.micro_batch_size, step.seq_length
    return TrainingSetup(
        micro_batch_size=int(args.micro_batch_size or micro),
        seq_length=int(args.seq_length or seq),
        fused_kernels=fused,
        gradient_accumulation_shard=bool(optimizer_cfg.get("gradient_accumulation_shard", False)),
        parallel_optimizer_threshold_kb=float(optimizer_cfg.get("parallel_optimizer_threshold", 64)),
        host_runtime=device_target.upper() == "CPU")


# ------------------------------------------------------------------------------------------ suggestions
@dataclasses.dataclass(frozen=True)
class Change:
    """One change to the run the planner may suggest; `apply` maps (parallel config, setup, offload) to the
    changed ones."""

    description: str
    apply: object
    excludes: str = ""       # changes of the same group are alternatives, never combined
    cost: int = 1            # how much it disturbs the run: throughput lost, global batch changed, ...


def candidate_changes(model_config, parallel_config, setup):
    """Single changes, gentlest first: optimizer sharding, recompute, offset, vocabulary split, offload, more
    pipeline stages."""
    from mindpretrain.parallel.pipeline import place_layers

    total = model_config.num_hidden_layers + (model_config.num_nextn_predict_layers or 0)
    current = tuple(setup.recompute or getattr(model_config, "recompute", None) or ("none",) * total)
    changes = []
    if not parallel_config.optimizer_shard:
        changes.append(Change("enable optimizer sharding (parallel.enable_parallel_optimizer: True)",
                              lambda p, s, o: (dataclasses.replace(p, optimizer_shard=True), s, o)))
    if any(mode == "none" for mode in current):
        changes.append(Change("selective recompute on every layer (recompute_config.select_recompute: True)",
                              lambda p, s, o: (p, dataclasses.replace(s, recompute=("selective",) * total), o),
                              "recompute"))
    if any(mode != "full" for mode in current):
        changes.append(Change("full recompute on every layer (recompute_config.recompute: True)",
                              lambda p, s, o: (p, dataclasses.replace(s, recompute=("full",) * total), o),
                              "recompute", cost=2))
    placement = place_layers(model_config, parallel_config)
    if not placement.explicit_offset and not placement.balanced:
        offset = tuple(placement.suggested_offset())
        changes.append(Change(f"balance the pipeline with offset: {list(offset)}",
                              lambda p, s, o, offset=offset: (dataclasses.replace(p, offset=offset), s, o),
                              "pipeline"))
    mp = parallel_config.model_parallel
    if parallel_config.vocab_emb_dp and mp > 1 and model_config.vocab_size % mp == 0:
        changes.append(Change("split embedding and head rows over model_parallel (parallel_config.vocab_emb_dp: False)",
                              lambda p, s, o: (dataclasses.replace(p, vocab_emb_dp=False), s, o)))
    changes.append(Change("offload optimizer state to host memory", lambda p, s, o: (p, s, True), cost=3))
    if parallel_config.data_parallel % 2 == 0 and total >= 2 * parallel_config.pipeline_stage and \
            (parallel_config.data_parallel // 2) % parallel_config.expert_parallel == 0:
        pp = parallel_config.pipeline_stage
        doubled = dataclasses.replace(parallel_config, pipeline_stage=2 * pp,
                                      data_parallel=parallel_config.data_parallel // 2,
                                      micro_batch_num=max(parallel_config.micro_batch_num, 2 * pp), offset=0)
        offset = tuple(place_layers(model_config, doubled).suggested_offset())
        changes.append(Change(
            f"pipeline_stage {doubled.pipeline_stage}, data_parallel {doubled.data_parallel}, "
            f"micro_batch_num {doubled.micro_batch_num}, offset {list(offset)}",
            lambda p, s, o, doubled=doubled, offset=offset: (
                dataclasses.replace(p, pipeline_stage=doubled.pipeline_stage, data_parallel=doubled.data_parallel,
                                    micro_batch_num=doubled.micro_batch_num, offset=offset), s, o),
            "pipeline", cost=4))
    return changes


def _worst_total(plan, offload):
    return max(stage.total - (stage.optimizer if offload else 0.0) for stage in plan.stages)


def suggest(model_config, parallel_config, setup, budget, device, peak_tflops, facts, max_changes=3):
    """The gentlest set of changes (lowest summed cost, then fewest) whose plan fits `budget`, and what was tried.

    Every single change is evaluated and reported; combinations of up to `max_changes` changes are
    then tried in order of cost, and the first that fits is the suggestion.
    """
    import itertools

    changes = candidate_changes(model_config, parallel_config, setup)
    results = {}

    def evaluate(combo):
        if combo not in results:
            changed, new_setup, offload = parallel_config, setup, False
            for change in combo:
                changed, new_setup, offload = change.apply(changed, new_setup, offload)
            try:
                changed.validate(model_config, changed.device_num)
                plan = build_plan(model_config, changed, new_setup, device=device, peak_tflops=peak_tflops,
                                  facts=facts)
                results[combo] = {"worst_stage_bytes": _worst_total(plan, offload)}
            except ConfigError as error:
                results[combo] = {"error": str(error)}
            results[combo]["change"] = " + ".join(change.description for change in combo)
            results[combo]["fits"] = results[combo].get("worst_stage_bytes", float("inf")) <= budget
        return results[combo]

    tried = [evaluate((change,)) for change in changes]
    combos = [combo for size in range(1, max_changes + 1) for combo in itertools.combinations(changes, size)
              if len({c.excludes for c in combo if c.excludes}) == len([c for c in combo if c.excludes])]
    combos.sort(key=lambda combo: (sum(change.cost for change in combo), len(combo)))
    for combo in combos:
        result = evaluate(combo)
        if result["fits"]:
            if len(combo) > 1:
                tried.append(result)
            return {"fits_with": result["change"], "tried": tried}
    return {"fits_with": None, "tried": tried}


# ------------------------------------------------------------------------------------------ output
def plan_to_dict(plan, budget, suggestion):
    parallel_config, model_config = plan.parallel_config, plan.model_config
    counts = {key: value for key, value in plan.counts.items() if key != "by_group"}
    worst = plan.worst_stage
    return {
        "parallel_config": parallel_config.to_dict(),
        "devices": parallel_config.device_num,
        "parameters": counts,
        "parameters_by_group": dict(plan.counts.get("by_group", {})),
        "setup": dataclasses.asdict(plan.setup),
        "placement": {"layers_per_stage": list(plan.placement.layers_per_stage),
                      "stages": [{"stage": stage.stage, "layers": list(stage.layer_ids),
                                  "mtp": list(stage.mtp_layers), "embedding": stage.has_embedding,
                                  "head": stage.has_head} for stage in plan.placement.stages],
                      "bubble_fraction": plan.bubble_fraction},
        "shard_shapes": [{"kind": layout.kind, "example": layout.name, "shape": list(layout.shape),
                          "split": list(layout.split), "shard_shape": list(layout.shard_shape),
                          "expert_parallel": layout.expert_parallel, "replicas": layout.replicas}
                         for layout in kind_summary(plan.layouts)],
        "memory_bytes_per_device": [dict(dataclasses.asdict(stage), total=stage.total,
                                         total_without_recompute=stage.total_without_recompute)
                                    for stage in plan.stages],
        "worst_stage": worst.stage,
        "worst_stage_bytes": worst.total,
        "moe_dispatch": _planned_dispatch(plan),
        "device_memory_bytes": budget,
        "fits": worst.total <= budget,
        "optimizer_factor": optimizer_factor(model_config),
        "communication_bytes_per_step": plan.communication,
        "flops_per_token": plan.flops_per_token,
        "device": plan.device,
        "peak_flops_assumed": plan.peak_flops,
        "suggestion": suggestion,
    }


def _gib(value):
    return f"{value / GIB:8.2f}"


def format_plan(plan, budget, suggestion):
    """The plan as the text `tools/plan.py` prints, one section after another."""
    lines = []
    for section in (_layout_lines(plan), _placement_lines(plan), _shard_lines(plan), _memory_lines(plan, budget),
                    _flops_lines(plan), _suggestion_lines(suggestion)):
        if section:
            if lines:
                lines.append("")
            lines.extend(section)
    return "\n".join(lines)


def _planned_dispatch(plan):
    """The MoE dispatch the plan counts, as the launcher builds it (None: the device default)."""
    dispatch = getattr(plan.model_config, "moe_dispatch", None) or "device default"
    if dispatch == "grouped_matmul" and plan.parallel_config.expert_parallel > 1:
        return "grouped_matmul (dropless token exchange)"
    return dispatch


def _layout_lines(plan):
    parallel_config, model_config, counts = plan.parallel_config, plan.model_config, plan.counts
    lines = []
    add = lines.append
    add(f"layout: dp {parallel_config.data_parallel} x mp {parallel_config.model_parallel} x pp "
        f"{parallel_config.pipeline_stage} = {parallel_config.device_num} devices; ep "
        f"{parallel_config.expert_parallel} (expert tp {parallel_config.expert_tensor_parallel}), micro_batch_num "
        f"{parallel_config.micro_batch_num}, seq_parallel {parallel_config.use_seq_parallel}, vocab_emb_dp "
        f"{parallel_config.vocab_emb_dp}, optimizer_shard {parallel_config.optimizer_shard}")
    setup = plan.setup
    kernels = "fused (flash attention; Ascend)" if setup.fused_kernels else "reference (CPU ops)"
    add(f"step: micro batch {setup.micro_batch_size} x seq {setup.seq_length}, kernels {kernels}, "
        f"params {model_config.param_init_type}, compute {model_config.compute_dtype}, moe_dispatch "
        f"{_planned_dispatch(plan)}")
    add("")
    add("parameters")
    for key in ("total_main", "mtp", "total_with_mtp", "activated_main", "activated_mtp"):
        if key in counts:
            add(f"  {key:<22} {counts[key]:>20,}  ({counts[key] / 1e9:.2f}B)")
    return lines


def _placement_lines(plan):
    lines = []
    add = lines.append
    add("pipeline placement (decoder layers, then MTP blocks numbered after them)")
    for stage in plan.placement.stages:
        ids = stage.layer_ids
        span = f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else f"{ids[0]}"
        extras = [name for name, flag in (("embedding", stage.has_embedding), ("head", stage.has_head)) if flag]
        if stage.mtp_layers:
            extras.append(f"MTP {list(stage.mtp_layers)}")
        add(f"  stage {stage.stage:>2}: {len(ids):>2} layers [{span}] {' '.join(extras)}")
    add(f"  bubble fraction (pp-1)/(m+pp-1): {plan.bubble_fraction:.3f}")
    if not plan.placement.explicit_offset and not plan.placement.balanced:
        add(f"  note: unbalanced stages {list(plan.placement.layers_per_stage)}; "
            f"offset {plan.placement.suggested_offset()} spreads the remainder")
    return lines


def _shard_lines(plan):
    lines = []
    add = lines.append
    add("shard shapes per weight kind (per device)")
    add(f"  {'kind':<26} {'full shape':<18} {'split':<10} {'shard':<18} {'ep':>3} {'copies':>6}")
    for layout in kind_summary(plan.layouts):
        add(f"  {layout.kind:<26} {str(layout.shape):<18} {str(layout.split):<10} {str(layout.shard_shape):<18} "
            f"{layout.expert_parallel:>3} {layout.replicas:>6}")
    return lines


def _memory_lines(plan, budget):
    lines = []
    add = lines.append
    add("memory per device, GiB (optimizer factor %.1fx weights)" % optimizer_factor(plan.model_config))
    add(f"  {'stage':>5} {'layers':>6} {'weights':>8} {'grads':>8} {'optim':>8} {'gather':>8} {'activ':>8} "
        f"{'total':>8} {'no-recomp':>9}")
    for stage in plan.stages:
        add(f"  {stage.stage:>5} {stage.layers:>6} {_gib(stage.weights)} {_gib(stage.gradients)} "
            f"{_gib(stage.optimizer)} {_gib(stage.gathered_weights)} {_gib(stage.activations)} {_gib(stage.total)} "
            f"{_gib(stage.total_without_recompute):>9}")
    worst = plan.worst_stage
    if worst.runtime:
        add(f"  total includes {worst.runtime / GIB:.2f} GiB of the CPU process's runtime and memory pool "
            f"(mindpretrain/planning/cost_model.py CPU_RUNTIME_BYTES)")
    verdict = "fits" if worst.total <= budget else "DOES NOT FIT"
    add(f"  worst stage {worst.stage}: {worst.total / GIB:.2f} GiB of {budget / GIB:.2f} GiB -> {verdict}")
    add("")
    add("communication per device per step, GiB")
    for key, value in plan.communication.items():
        add(f"  {key:<20} {value / GIB:10.2f}")
    return lines


def _flops_lines(plan):
    lines = []
    add = lines.append
    add(f"FLOPs per token (6 x activated + attention): {plan.flops_per_token:.4e}")
    if plan.peak_flops:
        add(f"device peak (configured assumption, {plan.device}): {plan.peak_flops / 1e12:.0f} TFLOPS; "
            f"tokens/s/device at 100% MFU: {plan.peak_flops / plan.flops_per_token:,.0f}")
    return lines


def _suggestion_lines(suggestion):
    if suggestion is None:
        return []
    lines = [f"suggestion: {suggestion['fits_with']}" if suggestion["fits_with"] else
             "suggestion: no single or combined change tried fits; more devices are needed"]
    for item in suggestion["tried"]:
        if "error" in item:
            lines.append(f"  tried {item['change']}: invalid ({item['error']})")
        else:
            lines.append(f"  tried {item['change']}: worst stage {item['worst_stage_bytes'] / GIB:.2f} GiB")
    return lines


def _parser():
    parser = argparse.ArgumentParser(description="Pre-flight memory/FLOPs/communication plan of a run YAML")
    parser.add_argument("--config", required=True)
    parser.add_argument("--devices", type=int, help="device count (default: dp x mp x pp of the YAML)")
    parser.add_argument("--device-memory", default=None,
                        help="usable memory per device (default: context.max_device_memory of the YAML, "
                             "else 64GiB)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--register_path", default=None, help="model plugin folder (default research/deepseek3)")
    parser.add_argument("--run_mode", default=None,
                        help="default: the YAML's run_mode; grpo plans the actor step and the rollout")
    parser.add_argument("--seq-length", type=int,
                        help="default model_config.seq_length (grpo: max_prompt_length + max_response_length)")
    parser.add_argument("--micro-batch-size", type=int,
                        help="default runner_config.batch_size or 1 (grpo: actor.ppo_micro_batch_size_per_device)")
    parser.add_argument("--fused-kernels", dest="fused_kernels", action="store_true", default=None,
                        help="activations of Ascend's fused kernels (flash attention); default unless "
                             "context.device_target is CPU")
    parser.add_argument("--reference-kernels", dest="fused_kernels", action="store_false",
                        help="activations of this repository's MindSpore ops as run on CPU")
    parser.add_argument("--device", default="atlas-800t-a2")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--check", action="store_true", help="exit 1 when the plan does not fit")
    return parser


def grpo_config(run_config, parallel_config, run_mode=None):
    """The validated rl_config of a GRPO run (None for other run modes); ConfigError names the bad key."""
    if run_mode is not None:
        run_config["run_mode"] = run_mode
    if str(run_config.get("run_mode") or "").lower() != "grpo":
        return None
    return rl_config_from_run_config(run_config, parallel_config.data_parallel)


def main(argv=None):
    args, rest = _parser().parse_known_args(argv)
    try:
        overrides = parse_override_args(rest)
        run_config, model_config, parallel_config = load_run(args.config, overrides, args.register_path)
        devices = args.devices if args.devices is not None else parallel_config.device_num
        parallel_config.validate(model_config, devices)
        rl_config = grpo_config(run_config, parallel_config, args.run_mode)
        budget = device_memory_budget(run_config, args.device_memory)
        setup = training_setup(run_config, model_config, args, rl_config, parallel_config.data_parallel)
        facts = model_facts(model_config, spec_for_config(model_config))
        plan = build_plan(model_config, parallel_config, setup, device=args.device, peak_tflops=args.peak_tflops,
                          facts=facts)
        rollout = None if rl_config is None else rollout_plan(plan, rl_config, facts.spec)
    except (ConfigError, RegistryError) as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        return 2
    fits = plan.worst_stage.total <= budget
    suggestion = None if fits else suggest(model_config, parallel_config, setup, budget, args.device,
                                           args.peak_tflops, facts)
    decode_batch = None
    if rollout is not None and rollout.peak > budget:
        decode_batch = largest_fitting_decode_batch(plan, rl_config, budget, facts.spec)
    if args.json:
        report = plan_to_dict(plan, budget, suggestion)
        if rollout is not None:
            report["rollout"] = rollout_to_dict(rollout, budget, decode_batch)
        print(json.dumps(report, indent=1, default=_json_default))
    else:
        text = format_plan(plan, budget, suggestion)
        if rollout is not None:
            text += "\n\n" + "\n".join(format_rollout(rollout, budget, decode_batch))
        print(text)
    if rollout is not None:
        fits = rollout.peak <= budget
    return 1 if (args.check and not fits) else 0


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
