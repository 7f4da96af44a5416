"""Model config and model from a run YAML, through the registry: the one way training and planning build them.

Importing this module imports neither MindSpore nor the trainer, so `tools/plan.py` plans exactly the
config that training would build, on any machine.
"""
from mindpretrain import registry
from mindpretrain.validation import require


def build_model_config(run_config, device_target=None):
    """The validated model config from `model.model_config` (with `recompute_config` folded in), checked
    against the device when one is given. tools/plan.py calls this too, so it plans exactly what trains."""
    model_config_section = dict((run_config.get("model") or {}).get("model_config") or {})
    require("type" in model_config_section, "model.model_config.type", None, "must name a registered config class")
    recompute = (run_config.get("recompute_config") or {})
    if "recompute" not in model_config_section and recompute:
        if recompute.get("recompute"):
            model_config_section["recompute"] = recompute["recompute"]
        elif recompute.get("select_recompute"):
            model_config_section["recompute"] = "selective"
    model_config = registry.build("config", model_config_section)
    check = getattr(model_config, "check_device", None)
    if device_target is not None and check is not None:
        check(device_target)
    return model_config


def build_model(run_config, device_target):
    """Model config and model from `model.model_config` / `model.arch` through the registry."""
    arch = dict((run_config.get("model") or {}).get("arch") or {})
    require("type" in arch, "model.arch.type", None, "must name a registered model class")
    model_config = build_model_config(run_config, device_target)
    model = registry.get("model", arch["type"])(model_config)
    return model_config, model
