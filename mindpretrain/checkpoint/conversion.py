"""HuggingFace checkpoints in and out, in bounded memory, all or nothing.

`convert_hf_to_native(hf_dir, output_dir)` turns a HuggingFace directory (e.g. DeepSeek-V3's official fp8
release with 128x128 `weight_scale_inv` blocks, or bf16/fp32) into our native weights;
`convert_native_to_hf(checkpoint, output_dir)` writes an HF directory that transformers and vLLM/SGLang load,
optionally re-quantised to fp8 blocks. What the model looks like (its config, parameter names and shapes, the
copies its release stores) comes from its `ModelSpec` (`mindpretrain.model_spec`): passed in, or found from the
directory's config.json `model_type` or a training checkpoint's config.yaml.

Two kinds of source beyond the release layout: a checkpoint without MTP weights (transformers saves none, yet
its config.json keeps `num_nextn_predict_layers`), handled by `mtp` = require | init | drop; and the same weights
under another framework's names (the spec's `foreign_layouts`, e.g. MindFormers'), recognised from the names
and derived tensor by tensor into ours.

Native weights directory (what `run_mindformer.py --load_checkpoint` is given):
    model-0000i-of-0000n.safetensors   tensors by their HF names (the spec's `parameter_specs`),
                                       bf16 or fp32, the expert-score bias always fp32; MTP layers kept
    model.safetensors.index.json       name -> shard
    config.json                        the spec's `hf_config_dict`, so its `config_from_hf` reads it back
    mindpretrain_checkpoint.json       marker: format, dtype, where it came from, duplicates dropped

How memory stays bounded: the plan is made from headers only; shards are then written one at a time from
memory-mapped sources in ~64 MB slabs (`conversion_io`), so peak memory is about one source shard of touched
pages plus a slab per worker, whatever the model size. How failure stays invisible: everything is written into
a sibling temporary directory that is renamed to `output_dir` only after every file was re-read and verified.
"""
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, NamedTuple

from mindpretrain.checkpoint import fp8
from mindpretrain.checkpoint.conversion_io import (
    compare_tensors, verify_written, write_index, write_shard)
from mindpretrain.checkpoint.safetensors_io import OpenFiles
from mindpretrain.checkpoint.conversion_plan import (
    ConversionError, Problems, TensorJob, inventory, layout_shards, match_sources, parse_size, translate_sources)
from mindpretrain.model_spec import spec_for_config_type, spec_for_model_type
from mindpretrain.registry import RegistryError
from mindpretrain.utils.logging import get_logger

logger = get_logger("conversion")

NATIVE_MARKER = "mindpretrain_checkpoint.json"
NATIVE_FORMAT = "mindpretrain-native-weights"
DEFAULT_MAX_SHARD = "5GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
ALWAYS_FP32_SUFFIXES = ("e_score_correction_bias",)   # updated by +-0.001 steps: bf16 would freeze it
IGNORED_NATIVE_PREFIXES = ("optimizer.",)             # training-checkpoint optimizer state is not exported
MTP_CHOICES = ("require", "init", "drop")             # what to do with a checkpoint without MTP weights
_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp32": "F32", "float32": "F32"}


# ----------------------------------------------------------------------------------------------------------
# Which model a directory holds
# ----------------------------------------------------------------------------------------------------------

def _read_json(path):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read {path}: {error}") from None


def _spec_lookup(find, key):
    try:
        return find(key)
    except RegistryError as error:
        raise ConversionError(str(error)) from None


def spec_of_hf_dir(hf_dir):
    """The registered spec of an HF (or native) directory, from its config.json `model_type`."""
    path = os.path.join(str(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} does not exist: an HF checkpoint directory holds config.json")
    model_type = _read_json(path).get("model_type")
    if not model_type:
        raise ConversionError(f"{path} has no model_type: cannot tell which model it holds")
    return _spec_lookup(spec_for_model_type, model_type)


def _training_model_config(checkpoint):
    """The `model.model_config` mapping of a training checkpoint's config.yaml ({} when there is none)."""
    yaml_path = os.path.join(checkpoint, "config.yaml")
    if not os.path.isfile(yaml_path):
        return {}
    import yaml

    with open(yaml_path, "r", encoding="utf-8") as handle:
        run_config = yaml.safe_load(handle) or {}
    return dict((run_config.get("model") or {}).get("model_config") or {})


def spec_of_native(checkpoint):
    """The registered spec of a native weights directory (config.json) or a training checkpoint (config.yaml's
    `model.model_config.type`)."""
    if not os.path.isdir(checkpoint):
        raise ConversionError(f"checkpoint directory {checkpoint} does not exist")
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return spec_of_hf_dir(checkpoint)
    type_name = _training_model_config(checkpoint).get("type")
    if not type_name:
        raise ConversionError(f"{checkpoint} has neither config.json nor a config.yaml with model.model_config.type:"
                              " cannot tell which model it holds")
    return _spec_lookup(spec_for_config_type, type_name)


def load_native_config(checkpoint, spec=None, **overrides):
    """The model config of a native weights directory (config.json) or a training checkpoint (config.yaml),
    with training fields in `overrides` (e.g. compute_dtype) set."""
    spec = spec or spec_of_native(checkpoint)
    if not os.path.isdir(checkpoint):
        raise ConversionError(f"checkpoint directory {checkpoint} does not exist")
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return spec.config_from_hf(checkpoint, **overrides)
    model_config = _training_model_config(checkpoint)
    if model_config:
        return spec.config_from_dict({**model_config, **overrides})
    raise ConversionError(f"{checkpoint} has neither config.json nor a config.yaml with model.model_config: "
                          "cannot tell which model it holds")


def _out_dtype(dtype):
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConversionError(f"dtype ({dtype!r}) must be one of bf16, fp32") from None


def _dtype_for(name, dtype):
    return "F32" if name.endswith(ALWAYS_FP32_SUFFIXES) else dtype


# ----------------------------------------------------------------------------------------------------------
# Progress and the all-or-nothing output directory
# ----------------------------------------------------------------------------------------------------------

class Progress:
    """Logs tensors done, GB written, throughput and ETA, at most every `interval` seconds."""

    def __init__(self, label, total_tensors, total_bytes, interval=2.0):
        self.label, self.total_tensors, self.total_bytes = label, total_tensors, total_bytes
        self.tensors = self.bytes = 0
        self.start = self._last = time.monotonic()
        self.interval = interval

    def advance(self, tensors, nbytes):
        self.tensors += tensors
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last >= self.interval or self.tensors == self.total_tensors:
            self._last = now
            self.log()

    def rate(self):
        return self.bytes / max(time.monotonic() - self.start, 1e-9)

    def log(self):
        rate = self.rate()
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
        logger.info("%s: %d/%d tensors, %.2f/%.2f GB, %.1f MB/s, ETA %.0f s", self.label, self.tensors,
                    self.total_tensors, self.bytes / 1e9, self.total_bytes / 1e9, rate / 1e6, eta)


def check_output_free(output_dir):
    """The absolute output path, or ConversionError if something is already there (nothing is overwritten)."""
    path = os.path.abspath(str(output_dir))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"output directory {path} already exists and is not empty; "
                              "choose a new directory (nothing is overwritten)")
    return path


class _StagingDirectory:
    """A temporary sibling of the output directory, renamed to it on success and deleted on any failure."""

    def __init__(self, output_dir):
        self.output_dir = check_output_free(output_dir)
        parent = os.path.dirname(self.output_dir)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=os.path.basename(self.output_dir) + ".partial-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)     # mkdtemp makes it private; the result is an ordinary directory

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        if os.path.isdir(self.output_dir):
            os.rmdir(self.output_dir)          # empty (checked above)
        os.rename(self.path, self.output_dir)
        return False


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _check_workers(workers):
    if not isinstance(workers, int) or workers < 1:
        raise ConversionError(f"workers ({workers!r}) must be an integer of at least 1")


def _execute(shards, directory, label, workers, metadata):
    """Write all shards (in this process, or `workers` processes), logging progress."""
    total_tensors = sum(len(shard.jobs) for shard in shards)
    progress = Progress(label, total_tensors, sum(shard.nbytes() for shard in shards))
    if workers <= 1 or len(shards) <= 1:
        for shard in shards:
            write_shard(shard, directory, metadata, on_tensor=lambda job: progress.advance(1, job.nbytes()))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
            futures = {pool.submit(write_shard, shard, directory, metadata): shard for shard in shards}
            for future in as_completed(futures):
                future.result()
                shard = futures[future]
                progress.advance(len(shard.jobs), shard.nbytes())
    return progress


# ----------------------------------------------------------------------------------------------------------
# HF -> native
# ----------------------------------------------------------------------------------------------------------

class HfPlan(NamedTuple):
    """What an HF -> native conversion will do: `model_config` describes the tensors written, `output_config`
    the native config.json (they differ when the MTP module is left to its initial values), `notes` one line
    each for the log and the marker."""

    model_config: Any
    output_config: Any
    shards: list
    checks: list
    notes: list
    source_layout: str


def _check_mtp(mtp):
    if mtp not in MTP_CHOICES:
        raise ConversionError(f"mtp ({mtp!r}) must be one of {', '.join(MTP_CHOICES)}")


def _mtp_plan(spec, model_config, found, mtp):
    """(config of the tensors to convert, config to write, source tensors, note or None) for an --mtp choice.

    A checkpoint without any MTP tensor (transformers saves none) is converted without them under `init`
    (config.json keeps the MTP module, which starts from its initial values when loaded) and `drop` (config.json
    has none); a partial MTP falls through to the usual check, which lists what is missing."""
    mtp_names, mtp_copies = spec.mtp_names(model_config)
    present = {name for name in found if name in mtp_names or name in mtp_copies}
    if not mtp_names or mtp == "require" or (present and not mtp_names <= present):
        return model_config, model_config, found, None
    lean = spec.without_mtp(model_config)
    if mtp == "drop":
        kept = OrderedDict((name, tensor) for name, tensor in found.items() if name not in present)
        return lean, lean, kept, (f"--mtp drop: the native model has no multi-token prediction ({len(present)} MTP "
                                  "tensors of the checkpoint skipped)")
    if present:
        return model_config, model_config, found, None
    return lean, model_config, found, ("the checkpoint has no MTP weights: the native weights leave them out and the "
                                       "MTP module starts from its initial values when loaded (--mtp init)")


def _missing_mtp_hint(spec, model_config, found, mtp):
    mtp_names, _ = spec.mtp_names(model_config)
    if mtp == "require" and mtp_names and not mtp_names & set(found):
        return "; it has no MTP weights (--mtp init or --mtp drop converts it)"
    return ""


def _hf_sources(hf_dir, spec, model_config, problems):
    """The source tensors under native names (translated when the names are a foreign layout's) and the
    layout's name ("HuggingFace" for the native names)."""
    found = inventory(hf_dir, problems)
    layout = spec.foreign_layout_of(list(found))
    if layout is None:
        return found, "HuggingFace"
    logger.info("%s holds %s names: converting them to ours", hf_dir, layout.name)
    return translate_sources(found, layout, model_config, problems), layout.name


def plan_hf_to_native(hf_dir, dtype="bf16", max_shard_size=DEFAULT_MAX_SHARD, spec=None, mtp="init"):
    """The `HfPlan` for converting `hf_dir`; raises ConversionError listing every problem. `spec`: the model's
    ModelSpec (default: found from config.json's model_type); `mtp`: require | init | drop (see `_mtp_plan`)."""
    _check_mtp(mtp)
    spec = spec or spec_of_hf_dir(hf_dir)
    out_dtype = _out_dtype(dtype)
    full_config = spec.config_from_hf(hf_dir)
    problems = Problems()
    found, source_layout = _hf_sources(hf_dir, spec, full_config, problems)
    model_config, output_config, found, note = _mtp_plan(spec, full_config, found, mtp)
    expected = spec.parameter_shapes(model_config)
    duplicates = spec.release_duplicates(model_config)
    sources, duplicate_sources = match_sources(found, expected, problems, duplicates)
    problems.raise_if_any(f"{source_layout} checkpoint {hf_dir} does not fit its config.json "
                          f"({spec.describe(full_config)}){_missing_mtp_hint(spec, full_config, found, mtp)}")
    jobs = [TensorJob(name, tensor, _dtype_for(name, out_dtype), scale=scale)
            for name, (tensor, scale) in sources.items()]
    found_order = {name: position for position, name in enumerate(found)}
    jobs.sort(key=lambda job: (job.source.path, found_order[job.source.name]))
    checks = [(copy, duplicate_sources[copy], sources[original][0], original)
              for copy, original in duplicates.items() if copy in duplicate_sources]
    return HfPlan(model_config, output_config, layout_shards(jobs, parse_size(max_shard_size)), checks,
                  [note] if note else [], source_layout)


def convert_hf_to_native(hf_dir, output_dir, dtype="bf16", workers=1, max_shard_size=DEFAULT_MAX_SHARD, spec=None,
                         mtp="init"):
    """Convert an HF directory (or the same weights under a foreign layout's names, e.g. MindFormers') into
    native weights at `output_dir` (created; must not exist or be empty). fp8 weights are dequantised with their
    block scales; MTP layers are kept (`mtp`: what to do when the checkpoint has none, see `_mtp_plan`); the
    copies the release stores (e.g. DeepSeek-V3's MTP embedding/head) are checked against the originals and
    dropped. Returns a summary dict."""
    _check_workers(workers)
    check_output_free(output_dir)
    spec = spec or spec_of_hf_dir(hf_dir)
    started = time.monotonic()
    plan = plan_hf_to_native(hf_dir, dtype, max_shard_size, spec, mtp)
    for note in plan.notes:
        logger.warning(note)
    dropped = _check_duplicates(plan.checks)
    fp8_count = sum(1 for shard in plan.shards for job in shard.jobs if job.scale is not None)
    with _StagingDirectory(output_dir) as staging:
        progress = _execute(plan.shards, staging.path, "hf->native", workers, {"format": "pt"})
        write_index(staging.path, plan.shards)
        verified = verify_written(staging.path, plan.shards, spec.parameter_shapes(plan.model_config))
        torch_dtype = "bfloat16" if _out_dtype(dtype) == "BF16" else "float32"
        _write_json(os.path.join(staging.path, "config.json"), spec.hf_config_dict(plan.output_config, torch_dtype))
        summary = {"format": NATIVE_FORMAT, "format_version": 1, "dtype": torch_dtype,
                   "source": {"kind": "huggingface", "layout": plan.source_layout,
                              "path": os.path.abspath(str(hf_dir)), "fp8_weights_dequantised": fp8_count,
                              "duplicates_dropped": dropped, "mtp": mtp, "notes": plan.notes},
                   "num_tensors": verified, "num_shards": len(plan.shards), "total_bytes": progress.bytes}
        _write_json(os.path.join(staging.path, NATIVE_MARKER), summary)
    summary["seconds"] = time.monotonic() - started
    logger.info("wrote %s: %d tensors in %d shards, %.2f GB, %.1f s", output_dir, verified, len(plan.shards),
                progress.bytes / 1e9, summary["seconds"])
    return summary


def _check_duplicates(checks):
    """The release's MTP copies of embedding/head: identical to the originals in the release; say so if not.
    Each pair is compared slab by slab and unmapped before the next, so this holds at most two such tensors."""
    dropped = {}
    for copy, copy_tensor, original_tensor, original in checks:
        readers = OpenFiles()
        try:
            identical, worst = compare_tensors(readers, copy_tensor, original_tensor)
        finally:
            readers.close()
        if identical:
            dropped[copy] = f"identical to {original}"
        else:
            dropped[copy] = f"differs from {original} (max |diff| {worst:.3g}); our model shares {original}"
            logger.warning("%s differs from %s (max |diff| %.3g); the native model shares %s, so the copy is "
                           "dropped", copy, original, worst, original)
    return dropped


# ----------------------------------------------------------------------------------------------------------
# native -> HF
# ----------------------------------------------------------------------------------------------------------

def _mtp_left_out(checkpoint, spec, model_config, found):
    """True when `checkpoint` was converted with --mtp init from weights without MTP layers and still has none:
    its export then has none either (as the transformers checkpoint it came from), config.json unchanged."""
    marker_path = os.path.join(checkpoint, NATIVE_MARKER)
    if not os.path.isfile(marker_path):
        return False
    with open(marker_path, "r", encoding="utf-8") as handle:
        source = (json.load(handle).get("source") or {})
    mtp_names, _ = spec.mtp_names(model_config)
    return source.get("mtp") == "init" and bool(mtp_names) and not mtp_names & set(found)


def plan_native_to_hf(checkpoint, dtype="bf16", quantise_fp8=False, max_shard_size=DEFAULT_MAX_SHARD, spec=None):
    """(model config, shards, names the export must hold) for exporting `checkpoint`; raises ConversionError
    listing every problem."""
    spec = spec or spec_of_native(checkpoint)
    out_dtype = _out_dtype(dtype)
    model_config = load_native_config(checkpoint, spec)
    problems = Problems()
    found = inventory(checkpoint, problems)
    weights_config = model_config
    if _mtp_left_out(checkpoint, spec, model_config, found):
        weights_config = spec.without_mtp(model_config)
        logger.warning("%s came from weights without MTP layers (--mtp init) and was not trained since: the "
                       "export has no MTP layers either; config.json keeps the MTP depth", checkpoint)
    expected = spec.parameter_shapes(weights_config)
    duplicates = spec.release_duplicates(weights_config)
    sources, _ = match_sources(found, expected, problems, ignored_prefixes=IGNORED_NATIVE_PREFIXES)
    problems.raise_if_any(f"checkpoint {checkpoint} does not fit its config ({spec.describe(model_config)})")
    jobs = []
    for name, (tensor, scale) in sources.items():
        quantise = quantise_fp8 and fp8.quantised_in_release(name, len(tensor.shape))
        jobs.append(TensorJob(name, tensor, _dtype_for(name, out_dtype), scale=scale, quantise=quantise))
    for copy, original in duplicates.items():    # the release layout stores these copies
        tensor, scale = sources[original]
        jobs.append(TensorJob(copy, tensor, out_dtype, scale=scale))
    release_order = {name: i for i, name in enumerate(list(expected) + list(duplicates))}
    jobs.sort(key=lambda job: release_order[job.name])
    return model_config, layout_shards(jobs, parse_size(max_shard_size)), list(release_order)


def convert_native_to_hf(checkpoint, output_dir, dtype="bf16", quantise_fp8=False, tokenizer_dir=None, workers=1,
                         max_shard_size=DEFAULT_MAX_SHARD, spec=None):
    """Write an HF directory (release names and shapes, MTP copies included) from native weights or a training
    checkpoint; with `quantise_fp8`, the weights the release quantises become fp8 + float32 `weight_scale_inv`
    (128x128 blocks) and config.json gets the release's `quantization_config`. Returns a summary dict."""
    _check_workers(workers)
    check_output_free(output_dir)
    spec = spec or spec_of_native(checkpoint)
    started = time.monotonic()
    model_config, shards, required = plan_native_to_hf(checkpoint, dtype, quantise_fp8, max_shard_size, spec)
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    with _StagingDirectory(output_dir) as staging:
        progress = _execute(shards, staging.path, "native->hf", workers, {"format": "pt"})
        write_index(staging.path, shards)
        verified = verify_written(staging.path, shards, required)
        config = spec.hf_config_dict(model_config, "bfloat16" if _out_dtype(dtype) == "BF16" else "float32")
        if quantise_fp8:
            config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
        _write_json(os.path.join(staging.path, "config.json"), config)
        for path in tokenizer_files:
            shutil.copy2(path, os.path.join(staging.path, os.path.basename(path)))
    summary = {"num_tensors": verified, "num_shards": len(shards), "total_bytes": progress.bytes,
               "fp8_quantised": sum(1 for s in shards for job in s.jobs if job.quantise),
               "tokenizer_files": [os.path.basename(p) for p in tokenizer_files],
               "seconds": time.monotonic() - started}
    logger.info("wrote %s: %d tensors in %d shards, %.2f GB, %.1f s", output_dir, verified, len(shards),
                progress.bytes / 1e9, summary["seconds"])
    return summary


def _tokenizer_files(tokenizer_dir):
    if tokenizer_dir is None:
        return []
    if not os.path.isdir(tokenizer_dir):
        raise ConversionError(f"tokenizer directory {tokenizer_dir} does not exist")
    files = [os.path.join(tokenizer_dir, name) for name in TOKENIZER_FILES
             if os.path.isfile(os.path.join(tokenizer_dir, name))]
    if not any(os.path.basename(path).startswith("tokenizer") for path in files):
        raise ConversionError(f"tokenizer directory {tokenizer_dir} holds none of "
                              f"{', '.join(n for n in TOKENIZER_FILES if n.startswith('tokenizer'))}")
    return files
