"""Device memory of GRPO's rollout and the shape of its actor step: what the planner adds for run_mode grpo.

GRPO here is colocated: the policy generates with its own training weights on the training devices, then
updates on the sampled rows. So a device holds, besides the training step's plan, the rollout phase:

- **KV cache**: `cache_bytes_per_token(model_config)` (the model's sampler; for DeepSeek-V3 MLA's compressed
  latent + rope key per token per layer, research/deepseek3/generation.py) x decode rows x positions
  (max_prompt_length + max_response_length, allocated once). ASSUMPTION for the split on Ascend: the cache is
  NOT divided by model_parallel, because MLA keeps one latent per token that every head reads, so each mp
  rank of a row holds all of it; it IS divided by pipeline stage, because a stage caches only its own decoder
  layers (MTP layers do not run in decode). Every row of the device's data-parallel shard passes through
  every stage, so each stage holds all of them.
- **decode rows**: `rollout.decode_batch_size` when set, else every sample generated at once on the device:
  (prompts generated per round) x n / dp, where a round is `rollout.prompts_per_step` prompts, or
  `dynamic_sampling.over_sampling_batch_size` with dynamic sampling on (it generates that many and keeps the
  groups that pass the filter).
- **reference**: with `actor.use_kl_loss`, one more copy of the weights in the compute dtype, sharded like
  the weights (so: the device's weight bytes x compute bytes / parameter bytes). It stays on the device in
  both phases.
- **decode activations** (an estimate): the prefill of all rows at once through one layer, i.e. the
  plugin's per-token activation terms of its largest layer on the stage (what training keeps of that layer
  without recompute, an upper bound of a forward-only working set) x rows x max_prompt_length, plus the
  float32 logits [rows, vocab] of one step on the stage with the output head.
- **training state kept**: the caller passes what stays allocated between the update and the rollout
  (MindSpore keeps Parameters, i.e. gradient accumulators and optimizer state, resident unless offloaded).
"""
import dataclasses
import importlib
from typing import List

from mindpretrain.model_spec import spec_for_config
from mindpretrain.planning.cost_model import DTYPE_BYTES, GIB, planning_hooks, terms_bytes
from mindpretrain.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class ActorStep:
    """The shape of GRPO's training step: micro batches of `micro_batch_size` rows of `seq_length` tokens."""

    seq_length: int
    micro_batch_size: int
    micro_batches_per_update: int    # per device, per optimizer step (one mini-batch)


def actor_step(rl_config, dp_size):
    """Sequence length (prompt + response) and micro batch of the actor's update, from a validated RLConfig."""
    actor, rollout = rl_config.actor, rl_config.rollout
    share = actor.ppo_mini_batch_size * rollout.n // dp_size
    return ActorStep(seq_length=rl_config.data.max_prompt_length + rollout.max_response_length,
                     micro_batch_size=actor.ppo_micro_batch_size_per_device,
                     micro_batches_per_update=share // actor.ppo_micro_batch_size_per_device)


def decode_rows(rl_config, dp_size):
    """Rows one device decodes at once (see the module docstring)."""
    if rl_config.rollout.decode_batch_size is not None:
        return rl_config.rollout.decode_batch_size
    prompts = rl_config.rollout.prompts_per_step
    if rl_config.dynamic_sampling.enable:
        prompts = rl_config.dynamic_sampling.over_sampling_batch_size
    return prompts * rl_config.rollout.n // dp_size


def cache_bytes_per_token(model_config, spec=None):
    """KV-cache bytes per token summed over the main layers, from the model plugin.

    The planning hooks have no seam for it yet: a hook named `cache_bytes_per_token` is used when a plugin
    provides one; otherwise the function of that name in the plugin package's `generation` module (the
    sampler's own count, so planner and sampler cannot disagree).
    """
    spec = spec or spec_for_config(model_config)
    hook = getattr(spec.planning, "cache_bytes_per_token", None)
    if hook is None:
        package = spec.config_class.__module__.rsplit(".", 1)[0]
        try:
            hook = getattr(importlib.import_module(f"{package}.generation"), "cache_bytes_per_token")
        except (ImportError, AttributeError):
            raise ConfigError(f"model.model_config.type ({spec.config_class.__name__}) must come with a KV-cache "
                              f"size (cache_bytes_per_token) for the rollout plan; {spec.name!r} has none") from None
    return float(hook(model_config))


@dataclasses.dataclass(frozen=True)
class RolloutMemory:
    """Bytes per device during the rollout (one pipeline stage)."""

    decode_rows: int
    positions: int
    cached_layers: float
    kv_cache_bytes: float
    reference_bytes: float
    decode_activation_bytes: float
    weight_bytes: float
    training_state_bytes: float = 0.0

    @property
    def total(self):
        return self.weight_bytes + self.training_state_bytes + self.reference_bytes + self.kv_cache_bytes + \
            self.decode_activation_bytes


def rollout_memory(model_config, parallel_config, rl_config, weight_bytes_per_device, layer_ids=None,
                   training_state_bytes=0.0, has_head=True, fused_kernels=True, spec=None):
    """The rollout's memory on one device of a stage holding `layer_ids` (None: an even share of the layers).

    `weight_bytes_per_device`: the stage's weights as the training plan holds them (param_init_type, after
    optimizer sharding); `training_state_bytes`: gradients and optimizer state that stay allocated.
    """
    spec = spec or spec_for_config(model_config)
    dp = parallel_config.data_parallel
    rows = decode_rows(rl_config, dp)
    prompt = rl_config.data.max_prompt_length
    positions = prompt + rl_config.rollout.max_response_length
    main = model_config.num_hidden_layers
    if layer_ids is None:
        decoder_layers = list(range(main))
        cached = main / parallel_config.pipeline_stage
    else:
        decoder_layers = [layer for layer in layer_ids if layer < main]
        cached = float(len(decoder_layers))
    kv = cache_bytes_per_token(model_config, spec) / main * cached * rows * positions
    reference = 0.0
    if rl_config.actor.use_kl_loss:
        reference = weight_bytes_per_device * DTYPE_BYTES[model_config.compute_dtype] / \
            DTYPE_BYTES[model_config.param_init_type]
    activations = _decode_activation_bytes(model_config, parallel_config, spec, decoder_layers, rows, prompt,
                                           positions, fused_kernels, has_head)
    return RolloutMemory(decode_rows=rows, positions=positions, cached_layers=cached, kv_cache_bytes=kv,
                         reference_bytes=reference, decode_activation_bytes=activations,
                         weight_bytes=float(weight_bytes_per_device), training_state_bytes=float(training_state_bytes))


def _decode_activation_bytes(model_config, parallel_config, spec, layers, rows, prompt, positions, fused, has_head):
    """One layer's prefill working set (the largest layer of the stage) plus one step's float32 logits."""
    hooks = planning_hooks(spec)
    tokens = rows * prompt
    per_token = max((terms_bytes(model_config, hooks.layer_activation_terms(
        model_config, parallel_config, layer, positions, fused, tokens)) for layer in layers), default=0.0)
    logits = rows * model_config.vocab_size * 4.0 if has_head else 0.0
    return per_token * tokens + logits


# ------------------------------------------------------------------------------------------- per stage
@dataclasses.dataclass(frozen=True)
class RolloutPlan:
    """The rollout next to the training step, for every pipeline stage of a training `Plan`."""

    actor: ActorStep
    stages: List[RolloutMemory]
    training_peaks: List[float]      # per stage: the training step's total + the reference copy

    def peak_of(self, stage):
        return max(self.training_peaks[stage], self.stages[stage].total)

    @property
    def worst_stage(self):
        return max(range(len(self.stages)), key=self.peak_of)

    @property
    def peak(self):
        return self.peak_of(self.worst_stage)


def rollout_plan(plan, rl_config, spec=None):
    """Rollout memory per stage of `plan` (built at the actor's step shape), the training state kept resident."""
    model_config, parallel_config = plan.model_config, plan.parallel_config
    spec = spec or spec_for_config(model_config)
    stages, training = [], []
    for placed, memory in zip(plan.placement.stages, plan.stages):
        rollout = rollout_memory(model_config, parallel_config, rl_config, memory.weights,
                                 layer_ids=placed.layer_ids, training_state_bytes=memory.gradients + memory.optimizer,
                                 has_head=placed.has_head, fused_kernels=plan.setup.fused_kernels, spec=spec)
        stages.append(rollout)
        training.append(memory.total + rollout.reference_bytes)
    return RolloutPlan(actor=actor_step(rl_config, parallel_config.data_parallel), stages=stages,
                       training_peaks=training)


def largest_fitting_decode_batch(plan, rl_config, budget, spec=None):
    """The largest `rollout.decode_batch_size` (up to the default rows) whose peak fits `budget`, or None.

    Peak memory grows with the rows (KV cache and prefill both scale with them), so a bisection finds it.
    """
    def fits(rows):
        rollout = dataclasses.replace(rl_config.rollout, decode_batch_size=rows)
        return rollout_plan(plan, dataclasses.replace(rl_config, rollout=rollout), spec).peak <= budget

    low, high = 0, decode_rows(rl_config, plan.parallel_config.data_parallel)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low or None


def rollout_to_dict(rollout, budget, fitting_decode_batch=None):
    """The "rollout" object of `tools/plan.py --json`."""
    worst = rollout.worst_stage
    stage = rollout.stages[worst]
    return {
        "actor_step": dataclasses.asdict(rollout.actor),
        "decode_rows": stage.decode_rows,
        "positions": stage.positions,
        "worst_stage": worst,
        "kv_cache_bytes": stage.kv_cache_bytes,
        "reference_bytes": stage.reference_bytes,
        "decode_activation_bytes": stage.decode_activation_bytes,
        "weight_bytes": stage.weight_bytes,
        "training_state_bytes": stage.training_state_bytes,
        "rollout_bytes": stage.total,
        "training_peak_bytes": rollout.training_peaks[worst],
        "peak_bytes": rollout.peak,
        "device_memory_bytes": budget,
        "fits": rollout.peak <= budget,
        "fitting_decode_batch_size": fitting_decode_batch,
        "stages": [dict(dataclasses.asdict(item), stage=index, total=item.total,
                        training_peak=rollout.training_peaks[index])
                   for index, item in enumerate(rollout.stages)],
    }


def format_rollout(rollout, budget, fitting_decode_batch=None):
    """The "rollout (GRPO)" section of the planner's text output; when the peak does not fit, the largest decode
    batch that does (`largest_fitting_decode_batch`)."""
    gib = GIB
    worst = rollout.worst_stage
    stage = rollout.stages[worst]
    actor = rollout.actor
    peak = rollout.peak
    lines = [
        "rollout (GRPO), per device, GiB",
        f"  actor step: micro batch {actor.micro_batch_size} x seq {actor.seq_length} "
        f"({actor.micro_batches_per_update} micro batches per update); decode: {stage.decode_rows} rows x "
        f"{stage.positions} positions",
        f"  worst stage {worst} ({stage.cached_layers:g} cached layers):",
        f"    {'weights':<58} {stage.weight_bytes / gib:8.2f}",
        f"    {'training state kept (gradients + optimizer state)':<58} {stage.training_state_bytes / gib:8.2f}",
        f"    {'reference copy (compute dtype, sharded like the weights)':<58} {stage.reference_bytes / gib:8.2f}",
        f"    {'KV cache (latent + rope key; split by stage, not by mp)':<58} {stage.kv_cache_bytes / gib:8.2f}",
        f"    {'decode activations (one layer prefill + step logits)':<58} "
        f"{stage.decode_activation_bytes / gib:8.2f}",
        f"    {'rollout total':<58} {stage.total / gib:8.2f}",
        f"    {'training step + reference copy':<58} {rollout.training_peaks[worst] / gib:8.2f}",
        f"  peak per device (max of both phases): {peak / gib:.2f} GiB of {budget / gib:.2f} GiB -> "
        f"{'fits' if peak <= budget else 'DOES NOT FIT'}",
    ]
    if peak > budget:
        lines.append(f"  suggestion: rl_config.rollout.decode_batch_size: {fitting_decode_batch}" if fitting_decode_batch
                     else "  suggestion: no decode batch fits; the training step itself needs changes (above)")
    return lines
