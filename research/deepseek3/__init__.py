"""DeepSeek-V3 plugin: `DeepseekV3Config` ("config"), `DeepseekV3ForCausalLM` ("model") and the model spec the
core reads (`spec.DEEPSEEK_V3_SPEC`: conversion, planning, shard tables, HF loading) register on import.

Two ways in, one set of classes:

* `--register_path research/deepseek3` imports this folder as the top-level package `deepseek3`. The project
  root is then put on sys.path and both classes are imported (so both register) from `research.deepseek3`, so
  there is only ever one `DeepseekV3Config` class (isinstance checks and the registry agree).
* `import research.deepseek3...` (tools, tests, the trainer) imports the config eagerly but the model (and so
  MindSpore, seconds of import time) only when `DeepseekV3ForCausalLM`/`DeepseekV3Model` is first looked up
  on this package or `research.deepseek3.deepseek3_model` is imported. The spec registers either way; it
  imports the config, `weight_mapping`, `sharding` and `planning`, none of which imports MindSpore.
"""
import importlib
import os
import sys

if __name__ != "research.deepseek3":
    _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

from research.deepseek3.deepseek3_config import DeepseekV3Config  # noqa: E402
from research.deepseek3 import spec  # noqa: E402,F401  (registers DEEPSEEK_V3_SPEC)

_MODEL_CLASSES = ("DeepseekV3ForCausalLM", "DeepseekV3Model")
__all__ = ["DeepseekV3Config", *_MODEL_CLASSES]

if __name__ != "research.deepseek3":          # --register_path: register the model class now
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM, DeepseekV3Model  # noqa: E402,F401


def __getattr__(name):
    """Model classes on first use (PEP 562), so importing a light submodule does not import MindSpore."""
    if name in _MODEL_CLASSES:
        return getattr(importlib.import_module("research.deepseek3.deepseek3_model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
