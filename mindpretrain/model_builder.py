"""Model config and model from a run YAML, through the registry: the one way training and planning build them.

Importing this module imports neither MindSpore nor the trainer, so `tools/plan.py` plans exactly the
config that training would build, on any machine.

Beside `model.model_config`, MindFormers keeps model settings in three other places of the run YAML, all read
here: the top-level `moe_config`, `recompute_config` (folded into per-layer recompute modes) and the
`TopkBiasBalanceCallback` entry of `callbacks` (its rate drives the expert-bias update).
"""
from mindpretrain import registry
from mindpretrain.validation import ConfigError, require

_BIAS_CALLBACK = "TopkBiasBalanceCallback"
# recompute_config keys with no effect here: communication recompute and slicing of the saved activation are
# MindSpore graph attributes of MindFormers' layers; operator-pattern selections map onto "selective".
RECOMPUTE_NO_EFFECT_KEYS = ("parallel_optimizer_comm_recompute", "mp_comm_recompute", "recompute_slice_activation",
                            "select_comm_recompute", "select_recompute_exclude", "select_comm_recompute_exclude")


def build_model_config(run_config, device_target=None):
    """The validated model config from `model.model_config` (with `moe_config`, `recompute_config` and the
    TopkBiasBalanceCallback folded in), checked against the device when one is given. tools/plan.py calls this
    too, so it plans exactly what trains. `model_config.no_effect_keys` names, as run-YAML paths, every key
    accepted without effect."""
    section = dict((run_config.get("model") or {}).get("model_config") or {})
    require("type" in section, "model.model_config.type", None, "must name a registered config class")
    moe_place = _merge_top_level_moe_config(section, run_config)
    _apply_bias_callback(section, run_config)
    recompute_section = run_config.get("recompute_config") or {}
    explicit_recompute = "recompute" in section
    model_config = registry.build("config", section)
    if not explicit_recompute and recompute_section:
        model_config = model_config.replace(recompute=per_layer_recompute(model_config, run_config))
    no_effect = getattr(model_config, "no_effect_keys", ())
    model_config.no_effect_keys = tuple(_run_yaml_path(key, moe_place) for key in no_effect) + tuple(
        f"recompute_config.{key}" for key in RECOMPUTE_NO_EFFECT_KEYS if key in recompute_section)
    check = getattr(model_config, "check_device", None)
    if device_target is not None and check is not None:
        check(device_target)
    return model_config


def per_layer_recompute(model_config, run_config):
    """`recompute_config` -> one mode per layer ("full" / "selective" / "none"; main layers, then MTP).

    MindFormers' forms: `recompute` True/False, or one entry per PIPELINE STAGE giving how many of the stage's
    layers (its first ones) are recomputed in full; `select_recompute` likewise, or a list / mapping of operator
    patterns (all layers, or the layers its per-stage lists name), mapped onto our "selective" mode (the attention
    core). Full recompute wins where both name a layer. Our own forms stay: a mode string, or one mode per layer.
    """
    section = run_config.get("recompute_config") or {}
    total = model_config.num_hidden_layers + model_config.num_nextn_predict_layers
    full, selective = section.get("recompute", False), section.get("select_recompute", False)
    if isinstance(full, str) or (isinstance(full, (list, tuple)) and any(isinstance(item, str) for item in full)):
        return full
    placement = None
    if any(isinstance(value, (list, tuple, dict)) for value in (full, selective)):
        from mindpretrain.parallel.parallel_config import ParallelConfig
        from mindpretrain.parallel.pipeline import place_layers
        placement = place_layers(model_config, ParallelConfig.from_run_config(run_config))
        if isinstance(full, (list, tuple)) and len(full) == total != placement.pipeline_stage:
            return full                                  # our per-layer list of bools
    full_layers = _recompute_layers(full, placement, total, "recompute_config.recompute")
    selective_layers = _recompute_layers(selective, placement, total, "recompute_config.select_recompute")
    return tuple("full" if layer in full_layers else "selective" if layer in selective_layers else "none"
                 for layer in range(total))


def _recompute_layers(value, placement, total, key):
    """The layer ids a recompute_config value names: bool (all/none), per-stage counts, operator patterns
    (a list of names: all layers) or a {pattern: bool | per-stage counts} mapping (the union)."""
    from mindpretrain.parallel.pipeline import layers_per_stage_count
    if value is None or isinstance(value, bool):
        return set(range(total)) if value else set()
    if isinstance(value, dict):
        chosen = set()
        for pattern, layers in value.items():
            chosen |= _recompute_layers(layers, placement, total, f"{key}.{pattern}")
        return chosen
    require(isinstance(value, (list, tuple)), key, value,
            "must be a bool, one entry per pipeline stage, or a list or mapping of operator patterns")
    if value and all(isinstance(item, str) for item in value):
        return set(range(total))
    return layers_per_stage_count(placement, list(value), key)


def _merge_top_level_moe_config(section, run_config):
    """MindFormers' YAMLs keep `moe_config` at the top level; pass it to the model config (one place only).
    Returns where the MoE settings came from, for the no-effect key paths."""
    top = run_config.get("moe_config")
    if top is None:
        return "model.model_config.moe_config"
    require("moe_config" not in section, "model.model_config.moe_config", section.get("moe_config"),
            "is also given as the top-level moe_config; set it in one place")
    section["moe_config"] = dict(top)
    return "moe_config"


def _apply_bias_callback(section, run_config):
    """`callbacks: [{type: TopkBiasBalanceCallback, topk_bias_update_rate, expert_num, ...}]` -> the model's
    `topk_bias_update_rate`. A model-side rate (model_config or moe_config) that differs is refused: the
    callback is how MindFormers applies the rate, so two different values would leave one silently unused."""
    entries = [entry for entry in (run_config.get("callbacks") or [])
               if isinstance(entry, dict) and entry.get("type") == _BIAS_CALLBACK]
    require(len(entries) <= 1, "callbacks", [entry.get("type") for entry in entries],
            f"must hold at most one {_BIAS_CALLBACK}")
    if not entries:
        return
    callback = entries[0]
    rate = callback.get("topk_bias_update_rate", 0.0)
    if callback.get("balance_via_topk_bias", True) is False:
        rate = 0.0
    moe = section.get("moe_config") or {}
    for key, value in (("model.model_config.topk_bias_update_rate", section.get("topk_bias_update_rate")),
                       ("moe_config.topk_bias_update_rate", moe.get("topk_bias_update_rate"))):
        if value is not None and value != rate:
            raise ConfigError(f"{key} ({value!r}) contradicts callbacks.{_BIAS_CALLBACK}.topk_bias_update_rate "
                              f"({rate!r}; 0 when its balance_via_topk_bias is False): set the rate in one place")
    experts = callback.get("expert_num")
    declared = moe.get("expert_num", section.get("n_routed_experts"))
    if experts is not None and declared is not None:
        require(experts == declared, f"callbacks.{_BIAS_CALLBACK}.expert_num", experts,
                f"must equal the model's routed experts ({declared})")
    section.pop("topk_bias_update_rate", None)
    if "moe_config" in section:
        section["moe_config"] = {key: value for key, value in moe.items() if key != "topk_bias_update_rate"}
    section["topk_bias_update_rate"] = rate


def _run_yaml_path(key, moe_place):
    if key.startswith("moe_config."):
        return f"{moe_place}.{key.split('.', 1)[1]}"
    return f"model.model_config.{key}"


def build_model(run_config, device_target, configure=None):
    """Model config and model from `model.model_config` / `model.arch` through the registry; `configure(model
    config)` runs in between (e.g. to attach the rank's expert layout, which needs the config's expert count)."""
    arch = dict((run_config.get("model") or {}).get("arch") or {})
    require("type" in arch, "model.arch.type", None, "must name a registered model class")
    model_config = build_model_config(run_config, device_target)
    if configure is not None:
        configure(model_config)
    model = registry.get("model", arch["type"])(model_config)
    return model_config, model
