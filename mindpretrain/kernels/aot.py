"""Where the project's CPU kernels come from: the `_cpu_kernels` extension (built by setup.py), whose exported C
functions MindSpore's custom "aot" ops call by name, and the settings they share (threads, oneDNN's sgemm).

A fused op applies only where `available()`: the extension is built and the graph runs on CPU (Ascend has its
own fused kernels, and the shard strategies describe the unfused ops); callers keep the unfused ops otherwise.
"""
import glob
import os

import mindspore as ms
from mindspore import ops

from mindpretrain.utils.threads import default_threads

try:
    from mindpretrain.kernels import _cpu_kernels
except ImportError:          # extension not built: callers keep the unfused MindSpore ops
    _cpu_kernels = None
else:
    _cpu_kernels.set_threads(default_threads())

_SGEMM = None                # whether oneDNN's sgemm was found (looked up once)


def available():
    """Whether the fused ops can run here: the extension is built and the graph runs on CPU."""
    return _cpu_kernels is not None and ms.get_context("device_target") == "CPU"


def sgemm_loaded():
    """Load dnnl_sgemm from MindSpore's own libdnnl (once); whether the kernels that multiply can run."""
    global _SGEMM
    if _SGEMM is None:
        libraries = sorted(glob.glob(os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so*")))
        _SGEMM = bool(libraries) and _cpu_kernels.set_sgemm_library(libraries[0])
    return _SGEMM


def set_threads(threads):
    """Threads every kernel of the extension splits its work over (one setting for the process; the run's
    OMP_NUM_THREADS, else every core, from import on)."""
    _cpu_kernels.set_threads(int(threads))


def custom_op(symbol, out_shape, out_dtype, bprop=None):
    """A MindSpore custom aot primitive running `symbol` of the extension."""
    return ops.Custom(f"{_cpu_kernels.__file__}:{symbol}", out_shape=out_shape, out_dtype=out_dtype,
                      func_type="aot", bprop=bprop)
