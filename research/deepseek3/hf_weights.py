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
"""
import re

import numpy as np

from mindspore import Tensor

from mindpretrain.checkpoint import fp8
from mindpretrain.checkpoint.safetensors_io import OpenFiles, read_checkpoint_dir
from mindpretrain.model_spec import WeightsMismatchError
from mindpretrain.utils.logging import get_logger
from research.deepseek3.weight_mapping import hf_parameter_shapes, release_duplicates

logger = get_logger("deepseek3.hf_weights")

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
IGNORED_PREFIXES = ("optimizer.",)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointMismatchError(WeightsMismatchError):
    """The checkpoint does not fit the model; the message lists every problem found."""


def _layer_index(name):
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def plan_load(model_config, located, files, allow_missing_mtp=False, ignore_prefixes=IGNORED_PREFIXES):
    """Check headers only. -> (sources {name: (path, scale_path or None)}, duplicates {copy: (path, source)},
    notes) or raise CheckpointMismatchError listing every problem."""
    expected = hf_parameter_shapes(model_config)
    duplicates = release_duplicates(model_config)
    missing, extra, misshaped, bad_dtype = [], [], [], []
    sources, copies, notes = {}, {}, []

    for name, path in located.items():
        if name.endswith(fp8.SCALE_SUFFIX) and name[:-len(fp8.SCALE_SUFFIX)] in located:
            continue                                           # read together with its weight
        if name.startswith(tuple(ignore_prefixes)):
            continue
        if name in duplicates:
            shape = tuple(files(path).info(name)[1])
            want = expected[duplicates[name]]
            if shape != want:
                misshaped.append(f"{name}: {list(shape)}, expected {list(want)}")
            else:
                copies[name] = (path, duplicates[name])
            continue
        if name not in expected:
            extra.append(name)
            continue
        dtype_name, shape = files(path).info(name)
        shape = tuple(shape)
        if shape != expected[name]:
            misshaped.append(f"{name}: {list(shape)}, expected {list(expected[name])}")
            continue
        scale_name = name + fp8.SCALE_SUFFIX
        if dtype_name == "F8_E4M3":
            if scale_name not in located:
                bad_dtype.append(f"{name}: F8_E4M3 without {scale_name}")
                continue
            problem = fp8.check_scale_shape(name, shape, files(located[scale_name]).info(scale_name)[1])
            if problem:
                misshaped.append(problem)
                continue
            sources[name] = (path, located[scale_name])
        elif dtype_name in FLOAT_DTYPES:
            sources[name] = (path, None)
        else:
            bad_dtype.append(f"{name}: stored as {dtype_name} (need F32, BF16, F16 or F8_E4M3 + scale)")

    absent = [name for name in expected if name not in located]
    mtp_names = [name for name in expected if (_layer_index(name) or -1) >= model_config.num_hidden_layers]
    if allow_missing_mtp and mtp_names and set(mtp_names) <= set(absent):
        notes.append(f"checkpoint has no MTP layers: the {model_config.num_nextn_predict_layers} MTP module(s) "
                     "keep their initial values (main-model logits are unaffected)")
        absent = [name for name in absent if name not in set(mtp_names)]
    missing.extend(absent)

    if missing or extra or misshaped or bad_dtype:
        lines = []
        for title, items in (("missing", missing), ("unexpected", extra), ("misshaped", misshaped),
                             ("unreadable", bad_dtype)):
            if items:
                lines.append(f"{len(items)} {title}:\n    " + "\n    ".join(items))
        raise CheckpointMismatchError(
            f"checkpoint does not fit the model (hidden_size={model_config.hidden_size}, "
            f"num_hidden_layers={model_config.num_hidden_layers}, n_routed_experts={model_config.n_routed_experts}, "
            f"num_nextn_predict_layers={model_config.num_nextn_predict_layers}); nothing was loaded.\n"
            + "\n".join(lines))
    return sources, copies, notes


def _read(files, name, path, scale_path):
    handle = files(path)
    if scale_path is None:
        return np.asarray(handle.get(name), dtype=np.float32)
    scale = np.asarray(files(scale_path).get(name + fp8.SCALE_SUFFIX), dtype=np.float32)
    return fp8.dequantise(handle.get_raw(name), scale, "float32")


def load_hf_weights(model, path, allow_missing_mtp=False, ignore_prefixes=IGNORED_PREFIXES):
    """Load `path` into `model` (a DeepseekV3ForCausalLM). Returns a summary dict.

    allow_missing_mtp: accept a checkpoint without any MTP tensors (e.g. saved by transformers, whose
    DeepseekV3ForCausalLM has no MTP); the MTP modules then keep their values. A partial MTP is still an error.
    """
    model_config = model.model_config
    located = read_checkpoint_dir(path)
    files = OpenFiles()
    try:
        sources, copies, notes = plan_load(model_config, located, files, allow_missing_mtp, ignore_prefixes)
        values = {name: _read(files, name, file, scale) for name, (file, scale) in sources.items()}
        for copy, (file, source) in copies.items():
            duplicate = _read(files, copy, file, None)
            difference = float(np.max(np.abs(duplicate - values[source]))) if duplicate.size else 0.0
            if difference > 0:
                logger.warning("%s differs from %s (max abs diff %.3g); the model shares %s, the copy is ignored",
                               copy, source, difference, source)
    finally:
        files.close()
    params = dict(model.parameters_and_names())
    for name, array in values.items():
        param = params[name]
        param.set_data(Tensor(array, dtype=param.dtype))
    for note in notes:
        logger.warning(note)
    logger.info("loaded %d tensors from %s (%d MTP copies checked and ignored)", len(values), path, len(copies))
    return {"loaded": len(values), "duplicates_ignored": sorted(copies), "notes": notes}
