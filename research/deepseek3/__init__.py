"""DeepSeek-V3 plugin: importing it registers `DeepseekV3Config` ("config") and `DeepseekV3ForCausalLM` ("model").

Two ways in, one set of classes: `import research.deepseek3` (installed package / project root on sys.path), or
`--register_path research/deepseek3`, which imports this folder as the top-level package `deepseek3`. In the
second case the project root is put on sys.path and everything is imported from `research.deepseek3`, so
there is only ever one `DeepseekV3Config` class (isinstance checks and the registry agree).
"""
import os
import sys

if __name__ != "research.deepseek3":
    _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

from research.deepseek3.deepseek3_config import DeepseekV3Config  # noqa: E402
from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM, DeepseekV3Model  # noqa: E402

__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3Model"]
