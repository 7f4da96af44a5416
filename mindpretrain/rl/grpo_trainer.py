"""The GRPO loop (`run_mindformer.py --run_mode grpo`): prompts -> rollouts -> rewards -> filter -> advantages ->
reference and old log-probs -> ppo_epochs x mini-batch updates -> metrics -> checkpoint.

Colocated, as the seed recipes run it: the sampler decodes with the trained Parameters themselves, so each
update is what the next rollout samples from. Every data-parallel rank holds whole groups (its contiguous share
of the step's prompts, `prompts.rank_slice`); rewards, advantages and dynamic-sampling filters are computed per
rank, the loss aggregation, the metrics and the "another generation round?" decision over all ranks (AllReduce
of a few numbers). The update reuses pretraining's train step (`ForwardBackwardCell`, `UpdateStep`):
gradient averaging over micro batches and ranks, the global norm, clipping, the NaN skip limit
(`runner_config.max_consecutive_nan_steps`).

Resume is exact: a checkpoint stores the policy, the optimizer, the prompt sampler's position and the update
count; rollout draws are seeded from (seed, step, round, rank, chunk). The reference model is the frozen
initial policy (the `load_checkpoint` weights, or the seeded initialisation), rebuilt the same way on resume.
RL defaults: the MTP head, the MoE balance loss and the expert-bias update are off (the policy objective reads the
main head only; MTP is not trained in RL, as in verl and slime); `rl_config.actor.use_balance_loss` and
`update_expert_bias` turn the balance loss and the bias rule back on.
"""
import dataclasses
import json
import math
import os
import time

import numpy as np

from mindpretrain.rl.actor_step import GRPOPolicyLoss, TokenLogProbCell, aggregation_weights
from mindpretrain.rl.algorithms import grpo_advantages
from mindpretrain.rl.prompts import PromptSampler, rank_slice
from mindpretrain.rl.rollout import group_reward_std, sample_groups, sampling_params, training_rows
from mindpretrain.training.checkpoint import CheckpointManager
from mindpretrain.training.lr_schedule import build_lr_schedule
from mindpretrain.training.optimizer import build_optimizer
from mindpretrain.training.signals import StopRequest
from mindpretrain.training.train_step import ForwardBackwardCell, UpdateStep, clip_factor
from mindpretrain.training.trainer import TrainingError, local_weight_flags, model_parameters, parameter_checksum
from mindpretrain.utils.atomic_files import atomic_write
from mindpretrain.utils.logging import get_logger
from mindpretrain.validation import require

logger = get_logger("grpo")
STD_THRESHOLD = 1e-6          # dynamic sampling: a group whose rewards vary less carries no signal


class RankReducer:
    """Sums of small NumPy vectors over the data-parallel ranks (identity on one rank)."""

    def __init__(self, dp_size):
        import mindspore as ms
        from mindspore import ops

        self.ms, self.size = ms, dp_size
        self.all_reduce = ops.AllReduce() if dp_size > 1 else None

    def sum(self, values):
        values = np.asarray(values, np.float64)
        if self.all_reduce is None:
            return values
        return self.all_reduce(self.ms.Tensor(values.astype(np.float32))).asnumpy().astype(np.float64)


class GRPOTrainer:
    """`GRPOTrainer(context, rl_config, prompts, tokenizer, reference, rewards).train(resume, load_checkpoint)`.

    context: launch.RunContext (settings, model, dp); prompts: rl.prompts.PromptSet; reference: a frozen copy
    of the initial policy (None without a KL loss); rewards: an rl.rewards.RewardRunner."""

    def __init__(self, context, rl_config, prompts, tokenizer, reference, rewards, seed=0):
        import mindspore as ms

        self.ms = ms
        self.settings, self.model, self.model_config = context.settings, context.model, context.model_config
        self.dp, self.rl, self.prompts, self.tokenizer = context.dp, rl_config, prompts, tokenizer
        self.rewards, self.seed = rewards, int(seed)
        rollout, actor = rl_config.rollout, rl_config.actor
        self.length = rl_config.data.max_prompt_length + rollout.max_response_length
        model_length = getattr(self.model_config, "seq_length", None)
        require(not model_length or self.length <= model_length, "rl_config.data.max_prompt_length",
                rl_config.data.max_prompt_length, f"+ rollout.max_response_length ({rollout.max_response_length}) "
                f"must not exceed model.model_config.seq_length ({model_length}), the model's position tables")
        self.expert_layout = getattr(self.model_config, "expert_layout", None)
        # split experts exchange tokens in every forward, but each rank's sampler stops when its own rows are done
        require(self.expert_layout is None or not self.expert_layout.partitioned, "parallel_config.expert_parallel",
                getattr(self.expert_layout, "expert_parallel", 1),
                "must be 1 for run_mode grpo: the colocated sampler does not split experts over ranks yet")
        self.params = model_parameters(self.model)
        self.trainable = self.model.trainable_params()
        self.optimizer = build_optimizer(self.settings.optimizer, self.trainable)
        self.share = rollout.prompts_per_step * rollout.n // self.dp.size          # samples per rank and step
        self.mini_share = actor.ppo_mini_batch_size * rollout.n // self.dp.size
        self.micro = actor.ppo_micro_batch_size_per_device
        self.accumulation = self.mini_share // self.micro
        loss = GRPOPolicyLoss(self.model, actor, rollout.temperature, rl_config.on_policy)
        self.forward_backward = ForwardBackwardCell(loss, self.trainable, self.accumulation, self.dp.size,
                                                    local_weights=local_weight_flags(self.trainable,
                                                                                     self.expert_layout))
        self.apply_update = UpdateStep(self.optimizer)
        self.policy_logp = None if rl_config.on_policy else TokenLogProbCell(self.model, rollout.temperature)
        self.reference_logp = TokenLogProbCell(reference, rollout.temperature) if reference is not None else None
        # checkpoints count consumed prompts (a multiple of dp), not pretraining's batch_size x dp samples
        self.checkpoints = CheckpointManager(dataclasses.replace(self.settings, micro_batch_size=1), self.dp,
                                             self.params, self.optimizer, None,
                                             self.model, self.model_config, self.expert_layout)
        self.reducer = RankReducer(self.dp.size)
        self.decoder = self._decoder()
        self.pad_id = int(getattr(tokenizer, "pad_id", None) or 0)
        self.eos_ids = (tokenizer.eod_id,) if getattr(tokenizer, "eod_id", None) is not None else ()
        self.step, self.updates, self.skipped_steps, self.nan_in_a_row = 0, 0, 0, 0
        self.sampler = self._new_sampler()
        self.history = []
        self.stop_request = StopRequest()

    def _decoder(self):
        from mindpretrain.model_spec import spec_for_config

        spec = spec_for_config(self.model_config)
        require(spec.cached_decoder is not None, "run_mode", "grpo",
                f"needs a model with a cached decoder ({spec.name} has none)")
        rows = self.rl.rollout.decode_batch_size or self.share
        return spec.cached_decoder(self.model, rows, self.length)

    def _new_sampler(self, state=None):
        data = self.rl.data
        seed = self.seed if data.seed is None else data.seed
        if state is None:
            return PromptSampler(len(self.prompts), self._prompts_per_round(), seed, data.shuffle)
        return PromptSampler.from_state(len(self.prompts), self._prompts_per_round(), seed, data.shuffle, state)

    def _prompts_per_round(self):
        sampling = self.rl.dynamic_sampling
        return sampling.over_sampling_batch_size if sampling.enable else self.rl.rollout.prompts_per_step

    # --- rollouts ----------------------------------------------------------------------------------------
    def _draw_seed(self, step, round_index, chunk):
        rollout_seed = self.rl.rollout.seed
        base = self.seed if rollout_seed is None else rollout_seed
        return [base, step, round_index, self.dp.rank, chunk]

    def _generate_round(self, step, round_index):
        """One generation round of this rank's share of the next prompt batch, scored."""
        indices = rank_slice(self.sampler.next_batch(), self.dp.rank, self.dp.size)
        records = [self.prompts.records[index] for index in indices]
        samples = sample_groups(self.decoder, records, self.rl.rollout.n,
                                lambda chunk: sampling_params(self.rl.rollout, self.eos_ids,
                                                              self._draw_seed(step, round_index, chunk)),
                                self.pad_id, self.rl.data.max_prompt_length)
        started = time.time()
        texts = [self.tokenizer.decode(sample.response_ids, skip_special_tokens=True) for sample in samples]
        scored = self.rewards.score(texts, [sample.label for sample in samples])
        scores = scored.scores
        if self.rl.reward.shuffle_rewards:      # the control run: rewards carry no information on the sample
            scores = np.random.default_rng(self._draw_seed(step, round_index, 0) + [1]).permutation(scores)
        for sample, text, score in zip(samples, texts, scores):
            sample.text, sample.reward = text, float(score)
        return samples, time.time() - started, scored.failures

    def _collect(self, step, timing):
        """Generation rounds until every rank holds prompts_per_step / dp groups with a learning signal
        (dynamic sampling) or after one round; -> (samples, counters)."""
        n, sampling = self.rl.rollout.n, self.rl.dynamic_sampling
        want = self.share // n
        kept, counters = [], {"filtered_groups": 0.0, "rounds": 0.0, "reward_errors": 0.0}
        while True:
            started = time.time()
            samples, reward_time, failures = self._generate_round(step, int(counters["rounds"]))
            timing["gen"] += time.time() - started - reward_time
            timing["reward"] += reward_time
            counters["rounds"] += 1
            counters["reward_errors"] += failures
            groups = [samples[start:start + n] for start in range(0, len(samples), n)]
            if sampling.enable:
                stds = group_reward_std([sample.reward for sample in samples], n)
                informative = [group for group, std in zip(groups, stds) if std > STD_THRESHOLD]
                counters["filtered_groups"] += len(groups) - len(informative)
                groups = informative
            kept.extend(groups[:max(0, want - len(kept))])
            if not sampling.enable:
                break
            short = self.reducer.sum([max(0, want - len(kept))])[0]
            if short == 0:
                break
            if sampling.max_num_gen_batches and counters["rounds"] >= sampling.max_num_gen_batches:
                raise TrainingError(
                    f"dynamic sampling: after {int(counters['rounds'])} generation rounds (rl_config."
                    f"dynamic_sampling.max_num_gen_batches) {int(short)} of the step's "
                    f"{self.rl.rollout.prompts_per_step} groups are still missing: every response of the other "
                    f"{int(self.reducer.sum([counters['filtered_groups']])[0])} groups scored the same. Raise "
                    "max_num_gen_batches or over_sampling_batch_size, or check the grader and the prompts")
        for group_index, group in enumerate(kept):
            for sample in group:
                sample.group = group_index
        return [sample for group in kept for sample in group], counters

    # --- the step ----------------------------------------------------------------------------------------
    def _log_probs(self, cell, input_ids, labels):
        ms, micro = self.ms, self.micro
        parts = [cell(ms.Tensor(input_ids[start:start + micro]), ms.Tensor(labels[start:start + micro])).asnumpy()
                 for start in range(0, input_ids.shape[0], micro)]
        return np.concatenate(parts).astype(np.float32)

    def _columns(self, samples, timing):
        """The step's training columns [N, L] (this rank) and its advantages."""
        input_ids, labels, mask, _ = training_rows(samples, self.length, self.pad_id)
        rewards = np.asarray([sample.reward for sample in samples], np.float32)
        advantages = grpo_advantages(rewards, self.rl.rollout.n, self.rl.actor.norm_adv_by_std_in_grpo,
                                     response_mask=mask).astype(np.float32)
        started = time.time()
        ref_logp = (self._log_probs(self.reference_logp, input_ids, labels) if self.reference_logp is not None
                    else np.zeros_like(mask))
        timing["ref"] += time.time() - started
        started = time.time()
        old_logp = (self._log_probs(self.policy_logp, input_ids, labels) if self.policy_logp is not None
                    else np.zeros_like(mask))
        timing["old_log_prob"] += time.time() - started
        columns = {"input_ids": input_ids, "labels": labels, "mask": mask, "old_logp": old_logp,
                   "ref_logp": ref_logp, "advantages": advantages}
        return columns, rewards

    def _mini_batch_weights(self, mask):
        tokens, sequences = self.reducer.sum([mask.sum(), float((mask.sum(-1) > 0).sum())])
        scale = self.accumulation * self.dp.size
        agg = aggregation_weights(mask, self.rl.actor.loss_agg_mode, tokens, sequences, scale,
                                  self.rl.rollout.max_response_length)
        mean = aggregation_weights(mask, "token-mean", tokens, sequences, scale)
        return agg, mean

    def _update(self, columns, rows, schedule):
        """One optimizer update on this rank's rows of a mini batch -> (losses vector, grad_norm, lr, finite)."""
        ms = self.ms
        agg, mean = self._mini_batch_weights(columns["mask"][rows])
        stacked = [columns[key][rows] for key in ("input_ids", "labels", "mask", "old_logp", "ref_logp",
                                                  "advantages")] + [agg, mean]
        shape = (self.accumulation, self.micro, self.length)
        tensors = [ms.Tensor(np.ascontiguousarray(array.reshape(shape))) for array in stacked]
        losses, expert_load, grad_norm, grads = self.forward_backward(
            *tensors[:3], ms.Tensor(0.0, ms.float32), ms.Tensor(1.0, ms.float32), *tensors[3:])
        losses, grad_norm = losses.asnumpy(), float(grad_norm.asnumpy())
        lr = schedule(self.updates)
        finite = bool(np.all(np.isfinite(losses)) and math.isfinite(grad_norm))
        if finite:
            self.apply_update(grads, ms.Tensor(lr, ms.float32),
                              ms.Tensor(clip_factor(grad_norm, self.settings.max_grad_norm), ms.float32))
            self.updates += 1
            if self.rl.actor.update_expert_bias:
                update = getattr(self.model, "update_expert_bias", None)
                if update is not None and expert_load.size:
                    update(expert_load.asnumpy())
        return losses, grad_norm, lr, finite

    def _train_on(self, columns, schedule):
        """ppo_epochs x mini batches of updates; -> the mean of each actor metric over the updates."""
        totals, count = np.zeros(6), 0
        for _ in range(self.rl.actor.ppo_epochs):
            for start in range(0, self.share, self.mini_share):
                losses, grad_norm, lr, finite = self._update(columns, slice(start, start + self.mini_share),
                                                             schedule)
                if not finite:
                    self.nan_in_a_row += 1
                    logger.warning("step %d: non-finite GRPO loss (%s) or gradient norm (%s); update skipped "
                                   "(%d in a row, limit %d)", self.step + 1, losses[0], grad_norm,
                                   self.nan_in_a_row, self.settings.max_nan_steps)
                    if self.nan_in_a_row >= self.settings.max_nan_steps:
                        raise TrainingError(
                            f"stopping: {self.nan_in_a_row} consecutive GRPO updates had a non-finite loss or "
                            f"gradient (runner_config.max_consecutive_nan_steps = {self.settings.max_nan_steps});"
                            " the last good state is in the latest checkpoint — lower the learning rate")
                    continue
                self.nan_in_a_row = 0
                totals += np.array([losses[1], losses[2], losses[3], losses[4], grad_norm, lr])
                count += 1
        means = totals / max(count, 1)
        return {"actor/pg_loss": means[0], "actor/kl_loss": means[1], "actor/entropy": means[2],
                "actor/pg_clipfrac": means[3], "actor/grad_norm": means[4], "actor/lr": means[5],
                "actor/updates": count}

    def _step_metrics(self, samples, rewards, counters, timing, step_time):
        prompt_tokens = sum(len(sample.prompt_ids) for sample in samples)
        response_lengths = [len(sample.response_ids) for sample in samples]
        truncated = sum(sample.truncated for sample in samples)
        local = [rewards.sum(), len(samples), sum(response_lengths), truncated, prompt_tokens,
                 counters["filtered_groups"], counters["reward_errors"]]
        total = self.reducer.sum(local)
        count = max(total[1], 1.0)
        tokens = total[2] + total[4]
        metrics = {"step": self.step, "critic/score/mean": total[0] / count,
                   "response_length/mean": total[2] / count, "response_length/clip_ratio": total[3] / count,
                   "rollout/filtered_groups": int(total[5]), "rollout/gen_rounds": int(counters["rounds"]),
                   "reward/errors": int(total[6]),
                   "perf/total_num_tokens": int(tokens),
                   "perf/tokens_per_s_per_device": tokens / step_time / self.dp.size if step_time > 0 else 0.0,
                   "consumed_prompts": self.sampler.state()["consumed"],
                   "rollout/example": {"prompt": self.prompts.records[samples[0].prompt_index].text,
                                       "response": samples[0].text, "label": samples[0].label,
                                       "reward": samples[0].reward, "finish_reason": samples[0].finish_reason}}
        if self.dp.size == 1:          # a sum is all the ranks reduce; extremes only when there is one rank
            metrics["critic/score/max"], metrics["critic/score/min"] = float(rewards.max()), float(rewards.min())
        metrics.update({f"timing_s/{name}": value for name, value in timing.items()})
        metrics["timing_s/step"] = step_time
        return metrics

    def _one_step(self, schedule):
        started = time.time()
        timing = {"gen": 0.0, "reward": 0.0, "ref": 0.0, "old_log_prob": 0.0, "update_actor": 0.0}
        samples, counters = self._collect(self.step, timing)
        columns, rewards = self._columns(samples, timing)
        update_started = time.time()
        actor = self._train_on(columns, schedule)
        timing["update_actor"] = time.time() - update_started
        self.step += 1
        metrics = self._step_metrics(samples, rewards, counters, timing, time.time() - started)
        metrics.update(actor)
        if self.settings.param_checksum:
            metrics["param_checksum"] = parameter_checksum(self.params, self.optimizer, self.expert_layout)
        return metrics

    # --- the run -----------------------------------------------------------------------------------------
    def resume(self, location=None):
        point = self.checkpoints.resume(location)
        if point is None:
            return None
        extra = point.extra or {}
        require("sampler" in extra, "resume_training", point.directory,
                "is not a GRPO checkpoint (it has no prompt-sampler state)")
        self.step, self.skipped_steps = point.step, point.skipped_steps
        self.updates = int(extra.get("updates", 0))
        self.sampler = self._new_sampler(extra["sampler"])
        return point.directory

    def _save(self):
        return self.checkpoints.save(self.step, self.sampler.state()["consumed"], self.skipped_steps,
                                     extra_state={"sampler": self.sampler.state(), "updates": self.updates})

    def train(self, resume=False):
        """Run to `runner_config.train_steps` GRPO steps; returns a summary dict (status completed|terminated)."""
        settings = self.settings
        total_steps = settings.train_steps
        require(total_steps, "runner_config.train_steps", total_steps, "must be set for run_mode grpo (GRPO steps)")
        if resume:                  # this run's own checkpoints (output_dir); load_checkpoint is the initial policy
            self.resume()
        updates_per_step = self.rl.actor.ppo_epochs * self.rl.mini_batches_per_epoch
        schedule = build_lr_schedule(settings.lr_schedule, total_steps * updates_per_step)
        logger.info("GRPO: %d steps from step %d; %d prompts x %d samples per step (%d per rank), %d update(s) per "
                    "step, %s", total_steps, self.step, self.rl.rollout.prompts_per_step, self.rl.rollout.n,
                    self.share, updates_per_step, "on-policy" if self.rl.on_policy else "old log-probs recomputed")
        first, status = self.step, "completed"
        self.stop_request.install()
        try:
            while self.step < total_steps:
                metrics = self._one_step(schedule)
                self._write_metrics(metrics)
                stop = self.reducer.sum([1.0 if self.stop_request.requested else 0.0])[0] > 0
                if stop:
                    status = "terminated"
                    break
                if settings.save_steps and self.step % settings.save_steps == 0 and self.step < total_steps:
                    self._save()
            if status != "completed" or self.step > first:
                self._save()
        finally:
            self.stop_request.uninstall()
        return {"status": status, "steps": self.step - first, "history": self.history}

    def _write_metrics(self, metrics):
        self.history.append(metrics)
        path = os.path.join(self.settings.output_dir, "metrics", f"rank_{self.dp.process_rank}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.dp.process_rank == 0 and (self.step % self.settings.log_interval == 0 or self.step == 1):
            logger.info("grpo step %d: score %.4f, response length %.1f (clipped %.2f), pg_loss %.4f, kl %.5f, "
                        "entropy %.3f, clipfrac %.3f, grad_norm %.3f, filtered groups %d, %.0f tokens/s/device, "
                        "%.2f s (gen %.2f, update %.2f)", self.step, metrics["critic/score/mean"],
                        metrics["response_length/mean"], metrics["response_length/clip_ratio"],
                        metrics["actor/pg_loss"], metrics["actor/kl_loss"], metrics["actor/entropy"],
                        metrics["actor/pg_clipfrac"], metrics["actor/grad_norm"],
                        metrics["rollout/filtered_groups"], metrics["perf/tokens_per_s_per_device"],
                        metrics["timing_s/step"], metrics["timing_s/gen"], metrics["timing_s/update_actor"])
