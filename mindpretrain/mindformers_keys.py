"""MindFormers' run-level YAML keys and what each does here: honoured, or accepted with no effect.

A MindFormers user brings a YAML written for MindFormers' trainer. Every key of its run-level sections
(top level, `context`, `parallel`, `parallel_config`, `runner_config`, `runner_wrapper`, `optimizer`,
`lr_schedule`, `train_dataset`, `train_dataset_task`, `callbacks`, `recompute_config`, `tensorboard`,
`swap_config`, the `profile*` and `auto_tune` keys) is listed below with its fate:

- `HONOURED`: read and acted on (its reader validates the value);
- a sentence: accepted, but it changes nothing here, and that sentence says why (fused-kernel and
  graph-sinking switches, strategy files, profiling, evaluation during training, ...);
- `CHECKED_BY_READER`: a nested section whose keys its own reader validates (`model.model_config` and
  `moe_config` by the model config, `train_dataset.data_loader.config` by the dataset builder, `rl_config` by `mindpretrain.rl.config`).

`check_run_config` walks a resolved run YAML against this vocabulary: a key outside it fails with
"did you mean" (so `runner_config.batch_sise` is a typo, not a silently ignored setting), and the no-effect
keys present are returned as dotted names. Unknown top-level keys fail too; the top-level keys MindFormers
itself tolerates (`trainer`, `metric`, `eval_callbacks`, `eval_dataset`, `processor`, ...) are in the
vocabulary as no-effect keys. `no_effect_notice` joins them with the model config's own
`no_effect_keys` into the one start-up line `no effect here: key1, key2, ...`.
"""
import difflib

from mindpretrain.validation import ConfigError

HONOURED = "honoured"
CHECKED_BY_READER = "checked by its reader"

_NO_STRATEGY = "checkpoints hold whole tensors under their own names, so there are no strategy files"
_PROFILE = "no profiler is attached; per-step timings are in the step log and metrics/rank_N.jsonl"
_NO_EVAL = "no evaluation runs during training"
_PLAN = "the parallel plan derives it from parallel_config and the device (mindpretrain/parallel/plan.py)"
_HOST_LOOP = "the trainer steps on the host, one compiled step per call (no dataset sinking)"
_ASCEND_TUNING = "an Ascend compiler/communication tuning switch that mindpretrain does not pass on"
_FIXED_PIPELINE = "the data pipeline fixes it (drop_remainder on, no repeat, no multiprocessing, no prefetch tuning)"
_NO_LR_SCALE = "no learning-rate scaling by device count"
_COMM_RECOMPUTE = "communication recompute is not modelled: recompute modes act on whole layers or the attention core"

_TOP_LEVEL = {
    "seed": HONOURED, "output_dir": HONOURED, "load_checkpoint": HONOURED, "resume_training": HONOURED,
    "load_checkpoint_mtp": HONOURED,   # ours: run_mindformer.py --mtp {require,init,drop}
    "use_parallel": HONOURED, "run_mode": HONOURED, "register_path": HONOURED, "predict_batch_size": HONOURED,
    "context": HONOURED, "parallel": HONOURED, "parallel_config": HONOURED, "runner_config": HONOURED,
    "runner_wrapper": HONOURED, "optimizer": HONOURED, "lr_schedule": HONOURED, "train_dataset": HONOURED,
    "train_dataset_task": HONOURED, "callbacks": HONOURED, "recompute_config": HONOURED, "model": HONOURED,
    "moe_config": CHECKED_BY_READER, "tensorboard": HONOURED,
    "rl_config": CHECKED_BY_READER,   # run_mode grpo: mindpretrain/rl/config.py validates every key
    "load_ckpt_format": "the checkpoint format is recognised from the files (native safetensors or Hugging Face)",
    "src_strategy_path_or_dir": _NO_STRATEGY, "auto_trans_ckpt": _NO_STRATEGY, "only_save_strategy": _NO_STRATEGY,
    "transform_process_num": _NO_STRATEGY, "remove_redundancy": _NO_STRATEGY, "load_ckpt_async": _NO_STRATEGY,
    "trainer": "run_mindformer.py always runs the causal-LM trainer",
    "micro_batch_interleave_num": "micro-batch interleaving is not implemented",
    "do_eval": _NO_EVAL, "eval_step_interval": _NO_EVAL, "eval_epoch_interval": _NO_EVAL,
    "eval_dataset": _NO_EVAL, "eval_dataset_task": _NO_EVAL, "eval_callbacks": _NO_EVAL, "metric": _NO_EVAL,
    "processor": "read by run_mode predict and grpo (their tokenizer); training data is tokenized offline",
    "profile": _PROFILE, "profile_start_step": _PROFILE, "profile_stop_step": _PROFILE,
    "init_start_profile": _PROFILE, "profile_communication": _PROFILE, "profile_memory": _PROFILE,
    "profile_rank_ids": _PROFILE, "profile_pipeline": _PROFILE, "profile_level": _PROFILE,
    "profile_with_stack": _PROFILE, "profile_with_cpu": _PROFILE, "profile_with_memory": _PROFILE,
    "auto_tune": "no automatic tuning", "filepath_prefix": "no automatic tuning",
    "autotune_per_step": "no automatic tuning",
    "swap_config": "no activation or optimizer-state swapping (tools/plan.py plans device memory)",
    "train_precision_sync": "determinism is context.deterministic's", "use_legacy": "there is one model code path",
    "print_separate_loss": "lm_loss and mtp_loss are always logged separately",
    "monitor_config": "the step log already carries loss, grad norm, lr and expert load",
    "local_rank": "ranks come from msrun", "device_num": "the device count comes from msrun",
    "layer_scale": "no layer-wise learning-rate scaling", "layer_decay": "no layer-wise learning-rate scaling",
    "lr_scale": _NO_LR_SCALE, "lr_scale_factor": _NO_LR_SCALE,
    "ignore_data_skip": "resume continues from the checkpoint's consumed_samples",
    "data_skip_steps": "resume continues from the checkpoint's consumed_samples",
}

_CONTEXT = {
    "mode": HONOURED, "device_target": HONOURED, "device_id": HONOURED, "max_call_depth": HONOURED,
    "save_graphs": HONOURED, "save_graphs_path": HONOURED, "deterministic": HONOURED, "jit_config": HONOURED,
    "max_device_memory": HONOURED, "memory_optimize_level": HONOURED, "runtime_num_threads": HONOURED,
    "ascend_config": HONOURED,   # a section, below
    "enable_graph_kernel": _ASCEND_TUNING, "graph_kernel_flags": _ASCEND_TUNING,
    "pynative_synchronize": "not passed to MindSpore", "mempool_block_size": _ASCEND_TUNING,
    "affinity_cpu_list": "not passed to MindSpore",
}
_ASCEND_CONFIG = {key: _ASCEND_TUNING for key in (
    "parallel_speed_up_json_path", "precision_mode", "jit_compile", "atomic_clean_policy", "matmul_allow_hf32",
    "conv_allow_hf32", "op_precision_mode", "op_debug_option", "ge_options", "host_scheduling_max_threshold",
    "hccl_watchdog")}

_PARALLEL = {
    "enable_parallel_optimizer": HONOURED, "parallel_optimizer_config": HONOURED,
    "parallel_mode": _PLAN, "gradients_mean": _PLAN, "enable_alltoall": _PLAN, "full_batch": _PLAN,
    "dataset_strategy": _PLAN, "search_mode": _PLAN, "pipeline_config": _PLAN,
    "strategy_ckpt_config": _NO_STRATEGY, "strategy_ckpt_save_file": _NO_STRATEGY,
    "strategy_ckpt_load_file": _NO_STRATEGY,
}
_PARALLEL_OPTIMIZER_CONFIG = {
    "gradient_accumulation_shard": "read by tools/plan.py for the memory estimate only",
    "parallel_optimizer_threshold": "read by tools/plan.py for the memory estimate only",
    "optimizer_weight_shard_size": HONOURED,
    "optimizer_level": "MindSpore's default optimizer-shard level is used",
}

# parallel_config keys: ParallelConfig.from_dict validates the values; these are the fates.
_PARALLEL_CONFIG = {
    "data_parallel": HONOURED, "model_parallel": HONOURED, "expert_parallel": HONOURED,
    "pipeline_stage": HONOURED, "micro_batch_num": HONOURED, "use_seq_parallel": HONOURED,
    "vocab_emb_dp": HONOURED, "optimizer_shard": HONOURED, "offset": HONOURED,
    "expert_model_parallel": HONOURED, "optimizer_weight_shard_size": HONOURED,
    "context_parallel": HONOURED, "seq_split_num": HONOURED, "context_parallel_algo": HONOURED,
    "ulysses_degree_in_cp": HONOURED, "recompute": HONOURED,   # refused with a pointer by ParallelConfig
    "gradient_aggregation_group": "MindSpore groups the gradient all-reduces itself",
    "mem_coeff": "a MindFormers auto-parallel search weight; the layout is given explicitly",
}

_RUNNER_CONFIG = {
    "epochs": HONOURED, "batch_size": HONOURED, "gradient_accumulation_steps": HONOURED, "train_steps": HONOURED,
    "max_consecutive_nan_steps": HONOURED, "data_exhausted": HONOURED, "device": HONOURED,
    "device_peak_tflops": HONOURED, "log_param_checksum": HONOURED, "calculate_per_token_loss": HONOURED,
    "sink_mode": _HOST_LOOP, "sink_size": _HOST_LOOP, "per_epoch_size": _HOST_LOOP,
    "initial_epoch": "the resume position comes from the checkpoint",
    "initial_step": "the resume position comes from the checkpoint",
}
_RUNNER_WRAPPER = {"type": HONOURED, "scale_sense": HONOURED, "use_clip_grad": HONOURED, "max_grad_norm": HONOURED,
                   "local_norm": "per-parameter gradient norms are not logged"}
_SCALE_SENSE = {"type": HONOURED, "loss_scale_value": HONOURED, "scale_factor": HONOURED, "scale_window": HONOURED}
_OPTIMIZER = {"type": HONOURED, "betas": HONOURED, "eps": HONOURED, "weight_decay": HONOURED,
              "learning_rate": HONOURED, "swap": "optimizer state stays on the device"}
_LR_SCHEDULE = {key: HONOURED for key in ("type", "learning_rate", "warmup_steps", "warmup_ratio", "warmup_lr_init",
                                          "total_steps", "lr_end", "num_cycles", "decay_steps")}

_TRAIN_DATASET = {
    "data_loader": HONOURED, "num_parallel_workers": HONOURED,
    "input_columns": "the model always takes input_ids, labels and loss_mask",
    "construct_args_key": "the model always takes input_ids, labels and loss_mask",
    "python_multiprocessing": _FIXED_PIPELINE, "drop_remainder": _FIXED_PIPELINE, "repeat": _FIXED_PIPELINE,
    "numa_enable": _FIXED_PIPELINE, "prefetch_size": _FIXED_PIPELINE,
    "batch_size": "runner_config.batch_size gives the batch", "seed": "data_loader.config.seed gives the order",
}
_DATA_LOADER = {"type": HONOURED, "datasets_type": HONOURED, "sizes": HONOURED, "config": CHECKED_BY_READER,
                "shuffle": HONOURED, "column_names": HONOURED, "phase": HONOURED,
                # MindDataset's (MindRecord finetune data)
                "dataset_dir": HONOURED, "dataset_files": HONOURED, "seed": HONOURED, "seq_length": HONOURED,
                "pad_token_id": HONOURED, "path_to_cache": HONOURED}
_DATA_LOADER_CONFIG = {"num_dataset_builder_threads": "indices are built in C++ on one thread",
                       "mmap_bin_files": "the .bin files are always memory-mapped"}
_DATASET_TASK = {"type": "the causal-LM dataset is the only one", "dataset_config": "a YAML alias of train_dataset"}

_RECOMPUTE_CONFIG = {"recompute": HONOURED, "select_recompute": HONOURED, "select_comm_recompute": HONOURED,
                     "parallel_optimizer_comm_recompute": _COMM_RECOMPUTE, "mp_comm_recompute": _COMM_RECOMPUTE,
                     "recompute_slice_activation": _COMM_RECOMPUTE}
_MODEL = {"model_config": CHECKED_BY_READER, "arch": HONOURED}
_ARCH = {"type": HONOURED, "auto_register": "classes register when --register_path is imported"}
_TENSORBOARD = {"tensorboard_dir": HONOURED,
                "tensorboard_queue_size": "scalars are written as they come"}

_CHECKPOINT_MONITOR = {
    "type": HONOURED, "save_checkpoint_steps": HONOURED, "keep_checkpoint_max": HONOURED,
    "checkpoint_format": HONOURED,
    "prefix": "checkpoint directories are named step_NNNNNNNN under output_dir/checkpoint",
    "directory": "checkpoints go under output_dir/checkpoint",
    "integrated_save": "rank 0 always writes one whole (integrated) checkpoint",
    "async_save": "checkpoints are written synchronously, to a temporary name, then renamed",
    "save_network_params": "weights, optimizer state and trainer state are always saved together",
    "save_trainable_params": "weights, optimizer state and trainer state are always saved together",
    "save_checkpoint_seconds": "checkpoints are saved by step", "keep_checkpoint_per_n_minutes": "kept by count",
    "remove_redundancy": _NO_STRATEGY,
}
_LOSS_MONITOR = {"type": HONOURED, "per_print_times": HONOURED,
                 **{key: "the trainer computes it from the run" for key in (
                     "learning_rate", "micro_batch_num", "micro_batch_interleave_num", "origin_epochs",
                     "dataset_size", "initial_epoch", "initial_step", "global_batch_size",
                     "gradient_accumulation_steps", "check_for_nan_in_loss_and_grad")}}
# Its rate and expert count are read by the model config builder (the bias update runs in the train step).
_TOPK_BIAS = {key: HONOURED for key in ("type", "balance_via_topk_bias", "topk_bias_update_rate", "expert_num",
                                        "micro_batch_num", "num_layers", "mtp_depth")}
_CALLBACKS = {"MFLossMonitor": _LOSS_MONITOR, "CheckpointMonitor": _CHECKPOINT_MONITOR,
              "TopkBiasBalanceCallback": _TOPK_BIAS}
_NO_EFFECT_CALLBACKS = {"SummaryMonitor": "TensorBoard scalars come from the tensorboard section",
                        "ProfileMonitor": _PROFILE, "TrainingStateMonitor": "the step log carries the state",
                        "ObsMonitor": "no object-storage upload", "EvalCallBack": _NO_EVAL,
                        "MoEDropRateCallback": "MoE routing is dropless"}

# Sections by dotted path; a section absent from the run YAML is simply not checked.
VOCABULARY = {
    "": _TOP_LEVEL, "context": _CONTEXT, "context.ascend_config": _ASCEND_CONFIG, "parallel": _PARALLEL,
    "parallel.parallel_optimizer_config": _PARALLEL_OPTIMIZER_CONFIG, "parallel_config": _PARALLEL_CONFIG,
    "runner_config": _RUNNER_CONFIG, "runner_wrapper": _RUNNER_WRAPPER, "runner_wrapper.scale_sense": _SCALE_SENSE,
    "optimizer": _OPTIMIZER, "lr_schedule": _LR_SCHEDULE, "train_dataset": _TRAIN_DATASET,
    "train_dataset.data_loader": _DATA_LOADER, "train_dataset_task": _DATASET_TASK,
    "recompute_config": _RECOMPUTE_CONFIG, "model": _MODEL, "model.arch": _ARCH, "tensorboard": _TENSORBOARD,
}
# Sections whose unknown keys their reader refuses; only their no-effect keys are listed here.
PARTIAL_VOCABULARY = {"train_dataset.data_loader.config": _DATA_LOADER_CONFIG}


def _section(run_config, path):
    node = run_config
    for part in path.split(".") if path else ():
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _unknown(dotted, key, known, what="key"):
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{dotted} is not a MindFormers {what} mindpretrain knows{hint}; "
                       "docs/mindformers.md lists every accepted key")


def _check_section(section, path, vocabulary, partial=False):
    """Dotted no-effect keys of one mapping; raises for a key outside `vocabulary` (unless `partial`)."""
    found = []
    for key in section:
        dotted = f"{path}.{key}" if path else str(key)
        outcome = vocabulary.get(key)
        if outcome is None:
            if partial:
                continue
            raise _unknown(dotted, str(key), vocabulary)
        if outcome not in (HONOURED, CHECKED_BY_READER):
            found.append(dotted)
    return found


def _check_callbacks(callbacks):
    if not (isinstance(callbacks, list) and all(isinstance(item, dict) for item in callbacks)):
        raise ConfigError(f"callbacks ({callbacks!r}) must be a list of mappings, each with a type")
    found = []
    for position, callback in enumerate(callbacks):
        kind = callback.get("type")
        path = f"callbacks.{kind}"
        if kind in _NO_EFFECT_CALLBACKS:
            found.append(path)
        elif kind in _CALLBACKS:
            found += _check_section(callback, path, _CALLBACKS[kind])
        else:
            raise _unknown(f"callbacks[{position}].type ({kind!r})", str(kind),
                           list(_CALLBACKS) + list(_NO_EFFECT_CALLBACKS), "callback")
    return found


TOKENIZER_RUN_MODES = ("predict", "grpo")     # runs that tokenize themselves (processor.tokenizer acts there)


def check_run_config(run_config):
    """Refuse keys outside MindFormers' run-level vocabulary; return the no-effect keys present (dotted)."""
    found = []
    for path, vocabulary in VOCABULARY.items():
        section = _section(run_config, path)
        if section is not None:
            found += _check_section(section, path, vocabulary)
    for path, vocabulary in PARTIAL_VOCABULARY.items():
        section = _section(run_config, path)
        if section is not None:
            found += _check_section(section, path, vocabulary, partial=True)
    if run_config.get("callbacks") is not None:
        found += _check_callbacks(run_config["callbacks"])
    if run_config.get("run_mode") in TOKENIZER_RUN_MODES:       # they read processor.tokenizer
        found = [key for key in found if key != "processor"]
    return tuple(dict.fromkeys(found))


def fate(dotted):
    """What a dotted run-level key does here: HONOURED, CHECKED_BY_READER, a no-effect reason, or None."""
    path, _, key = dotted.rpartition(".")
    if path.startswith("callbacks."):
        kind = path.split(".", 1)[1]
        return _CALLBACKS.get(kind, {}).get(key)
    return (VOCABULARY.get(path) or PARTIAL_VOCABULARY.get(path) or {}).get(key)


def honoured_only(section, path):
    """`section` without its no-effect keys, for builders that refuse keys they do not take (AdamW, ...)."""
    vocabulary = VOCABULARY.get(path, {})
    return {key: value for key, value in dict(section).items()
            if vocabulary.get(key, HONOURED) in (HONOURED, CHECKED_BY_READER)}


def no_effect_notice(run_keys, model_config=None):
    """The one start-up line naming every accepted key that changes nothing here, or None when there is none."""
    keys = list(run_keys) + list(getattr(model_config, "no_effect_keys", ()) or ())
    keys = list(dict.fromkeys(keys))
    return f"no effect here: {', '.join(keys)}" if keys else None
