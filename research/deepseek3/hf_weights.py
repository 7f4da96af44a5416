"""Load a HuggingFace-layout safetensors directory (index + shards, or single files) into a DeepSeek-V3 model.

All or nothing: every tensor's name, shape and dtype is checked against `weight_mapping` from the headers
first, and every problem — missing, unexpected, misshaped, unreadable dtype — is reported together in one
`CheckpointMismatchError`. Then all values are decoded, and only after that are they assigned, so a failure
never leaves a half-loaded model. (Peak host memory is therefore the model in float32: meant for
verification-sized models; the 671B release goes through `tools/convert_hf_to_native.py`, which streams.)

Accepted storage: F32, BF16, F16, and the release's fp8 (F8_E4M3 + `<name>_scale_inv` 128x128 block scales,
dequantised in float32). The MTP copies of embedding and head that the release stores
(`weight_mapping.release_duplicates`) are compared with the tensor they copy and then ignored (our MTP shares
them); a difference is logged. Tensors under `optimizer.` (training checkpoints) are ignored.

A checkpoint saved by MindFormers under its own names (`mindformers_weights`, detected from the names) is read
through its translation: each of our tensors is derived from the MindFormers tensors it was split or stacked
into, and checked and loaded like any other.
"""
import re

import numpy as np

from mindspore import Tensor

from mindpretrain.checkpoint import fp8
from mindpretrain.checkpoint.safetensors_io import OpenFiles, decode, read_checkpoint_dir
from mindpretrain.model_spec import WeightsMismatchError
from mindpretrain.parallel.expert_groups import keeps_parameter, model_arrays
from mindpretrain.utils.logging import get_logger
from research.deepseek3.mindformers_weights import MINDFORMERS_LAYOUT
from research.deepseek3.weight_mapping import hf_parameter_shapes, release_duplicates

logger = get_logger("deepseek3.hf_weights")

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
IGNORED_PREFIXES = ("optimizer.",)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
DERIVED = "<derived from MindFormers names>"     # the `located` path of a tensor made by a translation


class CheckpointMismatchError(WeightsMismatchError):
    """The checkpoint does not fit the model; the message lists every problem found."""


def _is_mtp(model_config, name):
    """Whether `name` belongs to an MTP module: `model.layers.{i}` with i >= num_hidden_layers."""
    match = _LAYER.match(name)
    return match is not None and int(match.group(1)) >= model_config.num_hidden_layers


def plan_load(model_config, located, files, allow_missing_mtp=False, ignore_prefixes=IGNORED_PREFIXES,
              problems=None):
    """Check headers only. -> (sources {name: (path, scale_path or None)}, duplicates {copy: (path, source)},
    notes) or raise CheckpointMismatchError listing every problem (`problems`: found before, e.g. by a
    translation)."""
    expected = hf_parameter_shapes(model_config)
    duplicates = release_duplicates(model_config)
    problems = problems or {}
    problems = {key: list(problems.get(key, [])) for key in ("missing", "unexpected", "misshaped", "unreadable")}
    sources, copies = {}, {}
    for name, path in located.items():
        if name.endswith(fp8.SCALE_SUFFIX) and name[:-len(fp8.SCALE_SUFFIX)] in located:
            continue                                           # read together with its weight
        if name.startswith(tuple(ignore_prefixes)):
            continue
        if name in duplicates:
            shape, want = tuple(files(path).info(name)[1]), expected[duplicates[name]]
            if shape != want:
                problems["misshaped"].append(f"{name}: {list(shape)}, expected {list(want)}")
            else:
                copies[name] = (path, duplicates[name])
        elif name not in expected:
            problems["unexpected"].append(name)
        else:
            source = _weight_source(name, path, expected[name], located, files, problems)
            if source is not None:
                sources[name] = source
    absent, notes = _absent(model_config, expected, located, allow_missing_mtp)
    problems["missing"].extend(absent)
    _raise_if_problems(model_config, problems)
    return sources, copies, notes


def _weight_source(name, path, expected_shape, located, files, problems):
    """(path, scale path or None) of one expected weight, or None with the problem recorded."""
    dtype_name, shape = files(path).info(name)
    shape = tuple(shape)
    if shape != expected_shape:
        problems["misshaped"].append(f"{name}: {list(shape)}, expected {list(expected_shape)}")
        return None
    if dtype_name in FLOAT_DTYPES:
        return path, None
    if dtype_name != "F8_E4M3":
        problems["unreadable"].append(f"{name}: stored as {dtype_name} (need F32, BF16, F16 or F8_E4M3 + scale)")
        return None
    scale_name = name + fp8.SCALE_SUFFIX
    if scale_name not in located:
        problems["unreadable"].append(f"{name}: F8_E4M3 without {scale_name}")
        return None
    problem = fp8.check_scale_shape(name, shape, files(located[scale_name]).info(scale_name)[1])
    if problem:
        problems["misshaped"].append(problem)
        return None
    return path, located[scale_name]


def _absent(model_config, expected, located, allow_missing_mtp):
    """(expected names the checkpoint lacks, notes): a checkpoint without any MTP layer may be allowed."""
    absent = [name for name in expected if name not in located]
    mtp_names = {name for name in expected if _is_mtp(model_config, name)}
    if allow_missing_mtp and mtp_names and mtp_names <= set(absent):
        note = (f"checkpoint has no MTP layers: the {model_config.num_nextn_predict_layers} MTP module(s) "
                "keep their initial values (main-model logits are unaffected)")
        return [name for name in absent if name not in mtp_names], [note]
    return absent, []


def _raise_if_problems(model_config, problems):
    lines = [f"{len(items)} {title}:\n    " + "\n    ".join(items) for title, items in problems.items() if items]
    if lines:
        raise CheckpointMismatchError(
            f"checkpoint does not fit the model (hidden_size={model_config.hidden_size}, "
            f"num_hidden_layers={model_config.num_hidden_layers}, n_routed_experts={model_config.n_routed_experts}, "
            f"num_nextn_predict_layers={model_config.num_nextn_predict_layers}); nothing was loaded.\n"
            + "\n".join(lines))


def _read(files, name, path, scale_path):
    handle = files(path)
    if scale_path is None:
        return np.asarray(handle.get(name), dtype=np.float32)
    scale = np.asarray(files(scale_path).get(name + fp8.SCALE_SUFFIX), dtype=np.float32)
    return fp8.dequantise(handle.get_raw(name), scale, "float32")


class DerivedFiles:
    """`OpenFiles` plus the tensors of a translation: `files(DERIVED)` answers for the derived tensors."""

    def __init__(self, files, derived, located):
        self.files, self.derived, self.located = files, derived, located

    def __call__(self, path):
        return self if path == DERIVED else self.files(path)

    def _sources(self, name):
        """[(stored dtype, stored bits)] of the tensors `name` is derived from."""
        return [(self.files(self.located[source]).info(source)[0], self.files(self.located[source]).get_raw(source))
                for source in self.derived[name].sources]

    def info(self, name):
        dtypes = {dtype for dtype, _ in self._sources(name)}
        return (dtypes.pop() if len(dtypes) == 1 else "F32"), self.derived[name].shape

    def get(self, name):
        """float32 values; the rearrangement runs on the stored bits (mixed dtypes: on float32 values)."""
        sources, derive = self._sources(name), self.derived[name].derive
        if len({dtype for dtype, _ in sources}) == 1:
            return np.asarray(decode(sources[0][0], derive(*[raw for _, raw in sources])), dtype=np.float32)
        return derive(*[np.asarray(decode(dtype, raw), dtype=np.float32) for dtype, raw in sources])

    def close(self):
        self.files.close()


def translate_foreign(model_config, located, files, drop_mtp=False):
    """(located, files, problems): a MindFormers-named checkpoint seen under our names (unchanged otherwise)."""
    if not MINDFORMERS_LAYOUT.detect(located):
        return located, files, {}
    found = {name: tuple(files(file).info(name)[1]) for name, file in located.items()}
    derived, unconsumed, misshaped = MINDFORMERS_LAYOUT.translate(model_config, found)
    if drop_mtp:
        unconsumed = [name for name in unconsumed if not MINDFORMERS_LAYOUT.is_mtp(model_config, name)]
    logger.info("the checkpoint holds MindFormers names: %d of our tensors are read from them", len(derived))
    problems = {"unexpected": [f"{name} (a MindFormers name no tensor of this model reads)" for name in unconsumed],
                "misshaped": misshaped}
    return {name: DERIVED for name in derived}, DerivedFiles(files, derived, located), problems


def _without_mtp_tensors(model_config, located):
    """`located` without the checkpoint's MTP layers (drop: a model without MTP ignores them)."""
    return {name: file for name, file in located.items() if not _is_mtp(model_config, name)}


def load_hf_weights(model, path, allow_missing_mtp=False, ignore_prefixes=IGNORED_PREFIXES, drop_mtp=False):
    """Load `path` into `model` (a DeepseekV3ForCausalLM). Returns a summary dict.

    allow_missing_mtp: accept a checkpoint without any MTP tensors (e.g. saved by transformers, whose
    DeepseekV3ForCausalLM has no MTP); the MTP modules then keep their values. A partial MTP is still an error.
    drop_mtp: the model has no MTP; the checkpoint's MTP layers (if any) are skipped.
    """
    model_config = model.model_config
    located, files = read_checkpoint_dir(path), OpenFiles()
    try:
        located, files, problems = translate_foreign(model_config, located, files, drop_mtp)
        if drop_mtp:
            located = _without_mtp_tensors(model_config, located)
        sources, copies, notes = plan_load(model_config, located, files, allow_missing_mtp, ignore_prefixes,
                                           problems)
        layout = getattr(model_config, "expert_layout", None)     # experts split over ranks: read our slice
        values = {name: _read(files, name, file, scale) for name, (file, scale) in sources.items()
                  if keeps_parameter(layout, name)}
        for copy, (file, source) in copies.items():
            duplicate = _read(files, copy, file, None)
            difference = float(np.max(np.abs(duplicate - values[source]))) if duplicate.size else 0.0
            if difference > 0:
                logger.warning("%s differs from %s (max abs diff %.3g); the model shares %s, the copy is ignored",
                               copy, source, difference, source)
    finally:
        files.close()
    params = dict(model.parameters_and_names())
    shapes = {name: tuple(param.shape) for name, param in params.items()}
    for name, array in model_arrays(shapes, values, layout).items():     # stacked experts stacked
        param = params[name]
        param.set_data(Tensor(array, dtype=param.dtype))
    for note in notes:
        logger.warning(note)
    logger.info("loaded %d tensors from %s (%d MTP copies checked and ignored)", len(values), path, len(copies))
    return {"loaded": len(values), "duplicates_ignored": sorted(copies), "notes": notes}
