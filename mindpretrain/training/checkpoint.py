"""Training checkpoints: one directory per save, complete or absent, resumable to the bit.

    <output_dir>/checkpoint/step_00000012/
        model.safetensors       every model Parameter by its HF name (fp32 master weights and the
                                expert score-correction biases), as stored in memory
        optimizer.safetensors   `optimizer.exp_avg.<name>`, `optimizer.exp_avg_sq.<name>`, `optimizer.adam_step`
        trainer_state.json      step, consumed samples, data epoch, RNG states, the model's parameter
                                shapes, data-parallel layout
        config.yaml             the resolved run configuration
        COMPLETE                written last: size and CRC-32 of every file above

The directory is written as `step_00000012.tmp` and renamed once COMPLETE is in it, so a crash
leaves at most a `.tmp` directory that nobody reads. Loading the newest checkpoint checks the
marker (sizes, checksums, safetensors headers); a damaged newest checkpoint is skipped with a
warning in favour of the previous good one. A checkpoint of another model shape is refused
outright, because silently falling back would train the wrong model.

Values are stored in their in-memory dtype (no pickle, no conversion), which is what makes
"stop after step 6, resume to 12" equal to an uninterrupted run bit for bit.

`CheckpointManager` is what the trainer uses: save, resume and weights-only loading of one run,
on top of the directory functions below.
"""
import json
import os
import re
import shutil
import zlib
from typing import NamedTuple

import numpy as np
import yaml

from mindpretrain.checkpoint.safetensors_io import SafetensorsError, open_safetensors, save_safetensors
from mindpretrain.parallel.expert_groups import full_model_shapes, gather_full_tensors, is_stacked, model_arrays
from mindpretrain.validation import require
from mindpretrain.utils.atomic_files import atomic_write, atomic_write_json
from mindpretrain.utils.logging import get_logger

logger = get_logger("checkpoint")
train_logger = get_logger("train")   # what the manager reports belongs to the training log

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
COMPLETE_MARKER = "COMPLETE"
OPTIMIZER_PREFIX = "optimizer."
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoint")


def step_dir_name(step):
    return f"step_{step:08d}"


def _file_crc32(path):
    crc = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(16 * 1024 * 1024)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def _as_numpy(parameter):
    return parameter.asnumpy() if hasattr(parameter, "asnumpy") else np.asarray(parameter)


def save_checkpoint(root, step, model_params, optimizer_state, trainer_state, run_config, keep_last=None):
    """Write checkpoint `step` under `root` (temporary name, then rename) and prune to `keep_last`.

    `model_params` / `optimizer_state`: {name: Parameter or array}. Returns the final directory.
    """
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_safetensors(os.path.join(tmp, MODEL_FILE),
                         {name: _as_numpy(value) for name, value in model_params.items()},
                         metadata={"format": "mindpretrain", "step": str(step)})
        save_safetensors(os.path.join(tmp, OPTIMIZER_FILE),
                         {OPTIMIZER_PREFIX + name: _as_numpy(value) for name, value in optimizer_state.items()},
                         metadata={"format": "mindpretrain", "step": str(step)})
        state = dict(trainer_state, step=step)
        atomic_write_json(os.path.join(tmp, STATE_FILE), state, indent=1)
        with atomic_write(os.path.join(tmp, CONFIG_FILE), "w") as handle:
            yaml.safe_dump(_plain(run_config), handle, sort_keys=False)
        files = {name: {"size": os.path.getsize(os.path.join(tmp, name)),
                        "crc32": _file_crc32(os.path.join(tmp, name))}
                 for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE)}
        atomic_write_json(os.path.join(tmp, COMPLETE_MARKER), {"step": step, "files": files}, indent=1)
        if os.path.isdir(final):  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        prune(root, keep_last)
    return final


def _plain(value):
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def list_checkpoints(root):
    """(step, directory) of every renamed (not `.tmp`) checkpoint under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def prune(root, keep_last):
    """Delete all but the newest `keep_last` checkpoints, and stale `.tmp` directories."""
    for _, directory in list_checkpoints(root)[keep_last:]:
        shutil.rmtree(directory, ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp") and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def verify_checkpoint(directory):
    """Raise CheckpointError unless `directory` is complete and undamaged."""
    marker = os.path.join(directory, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"checkpoint {directory} is incomplete: it has no {COMPLETE_MARKER} marker "
                              "(the save was interrupted)")
    try:
        with open(marker, "r", encoding="utf-8") as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {directory} has an unreadable {COMPLETE_MARKER} marker ({error})") from None
    for name, expected in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
        size = os.path.getsize(path)
        if size != expected["size"]:
            raise CheckpointError(f"checkpoint {directory}: {name} is truncated or altered "
                                  f"({size} bytes, {expected['size']} were written)")
        if _file_crc32(path) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {directory}: {name} is corrupt (checksum mismatch)")
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            open_safetensors(os.path.join(directory, name)).close()
        except SafetensorsError as error:
            raise CheckpointError(f"checkpoint {directory}: {error}") from None


def find_resumable(root):
    """The newest checkpoint under `root` that verifies; damaged newer ones are skipped with a warning.

    Returns None when `root` holds no checkpoint; raises CheckpointError when all are damaged.
    """
    candidates = list_checkpoints(root)
    problems = []
    for _, directory in candidates:
        try:
            verify_checkpoint(directory)
        except CheckpointError as error:
            logger.warning("skipping damaged checkpoint: %s", error)
            problems.append(str(error))
            continue
        if problems:
            logger.warning("resuming from the previous good checkpoint %s", directory)
        return directory
    if problems:
        raise CheckpointError("no usable checkpoint under " + root + ":\n  " + "\n  ".join(problems))
    return None


def check_shapes(directory, expected_shapes, source_file=MODEL_FILE, prefix=""):
    """Refuse a checkpoint whose tensors do not match `expected_shapes` ({name: shape})."""
    path = os.path.join(directory, source_file)
    try:
        with open_safetensors(path) as handle:
            stored = {name[len(prefix):]: tuple(handle.info(name)[1]) for name in handle.keys()
                      if name.startswith(prefix)}
    except SafetensorsError as error:
        raise CheckpointError(f"checkpoint {directory}: {error}") from None
    expected = {name: tuple(shape) for name, shape in expected_shapes.items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    differing = sorted(name for name in set(expected) & set(stored) if expected[name] != stored[name])
    if not (missing or unexpected or differing):
        return
    lines = [f"checkpoint {directory} does not fit this model (it was saved from a different model "
             "configuration):"]
    for name in differing[:5]:
        lines.append(f"  {name}: shape {list(stored[name])} in the checkpoint, {list(expected[name])} in the model")
    if len(differing) > 5:
        lines.append(f"  ... and {len(differing) - 5} more tensors of other shapes")
    if missing:
        lines.append(f"  {len(missing)} model tensors are not in the checkpoint, e.g. {missing[0]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} checkpoint tensors are not in the model, e.g. {unexpected[0]}")
    raise CheckpointError("\n".join(lines))


def read_tensors(directory, file_name, prefix=""):
    """{name without prefix: array} of one checkpoint file (copied out of the memory map)."""
    with open_safetensors(os.path.join(directory, file_name)) as handle:
        return {name[len(prefix):]: np.array(handle.get_raw(name)) for name in handle.keys()
                if name.startswith(prefix)}


def read_trainer_state(directory):
    with open(os.path.join(directory, STATE_FILE), "r", encoding="utf-8") as handle:
        return json.load(handle)


def is_native_checkpoint(directory):
    return os.path.isfile(os.path.join(directory, MODEL_FILE)) and os.path.isfile(
        os.path.join(directory, STATE_FILE))


# --- RNG state as JSON (numpy's Mersenne Twister, Python's random) -----------------------------

def capture_rng_state():
    import random

    kind, keys, position, has_gauss, cached = np.random.get_state()
    python_state = random.getstate()
    return {"numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": [python_state[0], list(python_state[1]), python_state[2]]}


def restore_rng_state(state):
    import random

    if not state:
        return
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --- one run's checkpoints, as the trainer uses them ------------------------------------------------------------

class ResumePoint(NamedTuple):
    """Where a resumed run continues: the checkpoint it read and the loop counters stored in it."""

    directory: str
    step: int
    consumed_samples: int
    skipped_steps: int
    extra: dict = None     # what the run's loop stored beside its counters (`save(extra_state=...)`)


def resumable_directory(location):
    """`location` itself when it is one complete checkpoint (verified), else the newest good one under it."""
    if os.path.isfile(os.path.join(location, COMPLETE_MARKER)):
        verify_checkpoint(location)
        return location
    return find_resumable(location)


def _assign(parameter, array, source):
    from mindspore import Tensor

    require(tuple(array.shape) == tuple(parameter.shape), parameter.name, list(array.shape),
            f"in {source} does not match the model's shape {list(parameter.shape)}")
    parameter.set_data(Tensor(np.ascontiguousarray(array)).astype(parameter.dtype))


class CheckpointManager:
    """Save, resume and weights-only loading for one run.

    `settings` (trainer.RunSettings) gives output_dir, keep_last, the batch layout and the run YAML saved
    with each checkpoint; `params` is {name: Parameter} of the model; `loss_scaler` may be None. Only the
    process of global rank 0 writes (every rank holds the same state); every rank reads.
    """

    def __init__(self, settings, dp, params, optimizer, loss_scaler=None, model=None, model_config=None,
                 expert_layout=None):
        self.settings, self.dp = settings, dp
        self.params, self.optimizer, self.loss_scaler = params, optimizer, loss_scaler
        self.model, self.model_config = model, model_config
        # experts partitioned over ranks (mindpretrain.parallel.expert_groups): checkpoints still hold every
        # expert under its HF name, so a run saved at one expert_parallel resumes at another
        self.expert_layout = expert_layout

    @property
    def root(self):
        return checkpoint_root(self.settings.output_dir)

    def expected_shapes(self):
        """Shapes of the whole model (every expert, whichever rank holds it): what a checkpoint holds."""
        return full_model_shapes({name: tuple(param.shape) for name, param in self.params.items()},
                                 self.expert_layout)

    def save(self, step, consumed_samples, skipped_steps, extra_state=None):
        """Write checkpoint `step` (rank 0 only; returns its directory, None on other ranks).

        `extra_state`: a JSON-serialisable dict of a loop's own resume state (e.g. the GRPO prompt sampler),
        returned by `resume` as `ResumePoint.extra`. With partitioned experts every rank takes part (the other
        ranks' experts and their optimizer moments are gathered to write full tensors); experts stored stacked are
        written per expert, under their HF names."""
        params, optimizer_state = self.params, self.optimizer.state_parameters()
        partitioned = self.expert_layout is not None and self.expert_layout.partitioned
        if partitioned or any(is_stacked(name) for name in params):     # to HF names, every expert
            params = gather_full_tensors(params, self.expert_layout)
            optimizer_state = gather_full_tensors(optimizer_state, self.expert_layout)
        if self.dp.process_rank != 0:
            return None
        state = {"consumed_samples": consumed_samples, "skipped_steps": skipped_steps,
                 "dp_size": self.dp.size, "samples_per_step": self.settings.samples_per_step(self.dp.size),
                 "rng": capture_rng_state(),
                 "loss_scale": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
                 "parameter_shapes": {name: list(shape) for name, shape in self.expected_shapes().items()}}
        if extra_state is not None:
            state["extra"] = extra_state
        directory = save_checkpoint(self.root, step, params, optimizer_state, state,
                                    self.settings.run_config.to_dict(), keep_last=self.settings.keep_last)
        train_logger.info("saved checkpoint %s", directory)
        return directory

    def resume(self, location=None):
        """Restore weights, optimizer state, RNG and loss scale from the newest good checkpoint under
        `location` (default: this run's); returns a ResumePoint, or None when there is no checkpoint."""
        root = location or self.root
        directory = resumable_directory(root)
        if directory is None:
            train_logger.warning("resume_training: no checkpoint under %s, starting from step 0", root)
            return None
        check_shapes(directory, self.expected_shapes())
        optimizer_state = self.optimizer.state_parameters()
        check_shapes(directory, full_model_shapes({name: tuple(p.shape) for name, p in optimizer_state.items()},
                                                  self.expert_layout), OPTIMIZER_FILE, OPTIMIZER_PREFIX)
        self._load_model_tensors(directory)
        self._assign_all(optimizer_state, read_tensors(directory, OPTIMIZER_FILE, OPTIMIZER_PREFIX), directory)
        state = read_trainer_state(directory)
        batch, dp_size = self.settings.micro_batch_size, self.dp.size
        require(state["consumed_samples"] % (batch * dp_size) == 0, "resume", state["consumed_samples"],
                f"consumed samples are not a multiple of batch_size * dp ({batch} x {dp_size}); resume with the "
                "batch layout of the checkpoint")
        point = ResumePoint(directory, int(state["step"]), int(state["consumed_samples"]),
                            int(state.get("skipped_steps", 0)), state.get("extra"))
        restore_rng_state(state.get("rng"))
        self._restore_loss_scale(state.get("loss_scale"), directory)
        train_logger.info("resumed from %s: step %d, %d samples consumed", directory, point.step,
                          point.consumed_samples)
        return point

    def _load_model_tensors(self, directory):
        self._assign_all(self.params, read_tensors(directory, MODEL_FILE), directory)

    def _assign_all(self, parameters, arrays, directory):
        """HF-named checkpoint arrays into {name: Parameter}: this rank's experts only, stacked experts stacked."""
        shapes = {name: tuple(param.shape) for name, param in parameters.items()}
        for name, array in model_arrays(shapes, arrays, self.expert_layout).items():
            _assign(parameters[name], array, directory)

    def _restore_loss_scale(self, saved, directory):
        if self.loss_scaler is None:
            if saved:
                train_logger.warning("checkpoint %s was trained with loss scaling (scale %s); this run configures "
                                     "none (runner_wrapper.scale_sense)", directory, saved.get("scale"))
            return
        if not saved:
            train_logger.warning("checkpoint %s has no loss-scale state; starting from scale_sense's "
                                 "loss_scale_value %s", directory, self.loss_scaler.scale)
            return
        self.loss_scaler.load_state_dict(saved)

    def load_weights(self, path):
        """Model weights only (finetune / warm start): a native checkpoint, or a HuggingFace directory (or the
        same weights under MindFormers' names) read through the model's spec (`mindpretrain.model_spec`).

        Weights without MTP layers (saved by transformers): --mtp init leaves the model's MTP module at its
        initial values (one warning says so), require refuses them, drop accepts only a model without MTP
        (and skips the checkpoint's MTP layers, if any)."""
        if is_native_checkpoint(path):
            verify_checkpoint(path)
            check_shapes(path, self.expected_shapes())
            self._load_model_tensors(path)
        else:
            self._load_hf_weights(path, self.settings.load_checkpoint_mtp)
        train_logger.info("loaded weights from %s", path)

    def _load_hf_weights(self, path, mtp):
        from mindpretrain.checkpoint.hf_config_check import hf_config_differences
        from mindpretrain.model_spec import WeightsMismatchError, spec_for_config

        spec = spec_for_config(self.model_config)
        options = {"allow_missing_mtp": mtp != "require"}
        if mtp == "drop":
            if spec.mtp_names(self.model_config)[0]:
                raise CheckpointError(f"--load_checkpoint {path} with --mtp drop: the YAML's model has multi-token "
                                      f"prediction ({spec.describe(self.model_config)}); set its MTP depth to 0 "
                                      "(num_nextn_predict_layers: 0) to train without it, or use --mtp init")
            options["drop_mtp"] = True
        differences = hf_config_differences(spec, self.model_config, path, ignore=("num_nextn_predict_layers",))
        if differences:
            raise CheckpointError(f"--load_checkpoint {path}: its config.json describes another model than the "
                                  f"YAML's model.model_config ({'; '.join(differences)}); make the YAML match the "
                                  "checkpoint. Nothing was loaded")
        try:
            spec.load_hf_weights(self.model, path, **options)
        except WeightsMismatchError as error:
            raise CheckpointError(f"--load_checkpoint {path}: {error}") from None
