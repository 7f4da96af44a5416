"""The contract between the core and a model plugin: everything the core may know about a model family.

The core (conversion, planning, parallel layouts, the trainer) never imports a plugin. A plugin such as
`research/deepseek3` builds one `ModelSpec` and registers it (`register_spec`) when it is imported; the core
then finds it from a model config (`spec_for_config`) or from a HuggingFace `config.json`'s `model_type`
(`spec_for_model_type`). A second model family plugs in by registering its own spec; no core file changes.
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

from mindpretrain import registry

SPEC_KIND = "model_spec"


class ParameterSpec(NamedTuple):
    """One parameter of the native model. Native names are the HuggingFace checkpoint names.

    layer: index in the model's layer list (MTP layers after the main ones) or None; group: a plugin-defined
    family name (the planner treats "embedding" and "routed_expert" specially); expert: routed expert index or
    None; trainable: False for tensors updated outside the optimizer (e.g. expert-score biases).
    """

    name: str
    shape: Tuple[int, ...]
    layer: Optional[int]
    group: str
    expert: Optional[int]
    trainable: bool


class WeightsMismatchError(ValueError):
    """A weights directory does not fit the model; the message lists every problem (nothing was loaded)."""


@dataclasses.dataclass(frozen=True)
class ShardTable:
    """How a model's weights are split and which `.shard()` layout each of its op kinds assumes.

    weight_kinds: (kind, regex on the full parameter name, split symbol per dimension, routed expert?);
    op_symbols: op kind -> per-input tuples of mesh symbols (see `mindpretrain.parallel.strategies`);
    matmul_ops: op kinds computed as `x [T, in] @ W[out, in]^T` whose strategy follows the weight kind.
    """

    weight_kinds: Tuple[Tuple[str, str, Tuple[Optional[str], ...], bool], ...]
    op_symbols: Mapping[str, Tuple[Tuple[Optional[str], ...], ...]]
    matmul_ops: Tuple[str, ...]

    @property
    def op_kinds(self):
        return tuple(self.op_symbols) + tuple(self.matmul_ops)

    @property
    def kind_splits(self):
        return {kind: split for kind, _, split, _ in self.weight_kinds}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model family as the core sees it. Every callable takes the family's validated model config first.

    Fields are filled by the plugin; the core only calls them. `load_hf_weights(model, path)` raises
    `WeightsMismatchError` (or a subclass) when the directory does not fit.
    """

    name: str                                            # e.g. "deepseek_v3"
    model_types: Tuple[str, ...]                         # HF config.json `model_type` values it reads
    config_class: type                                   # the registered model config class
    config_from_hf: Callable[[str], Any]                 # HF directory (config.json) -> model config
    config_from_dict: Callable[[Dict[str, Any]], Any]    # YAML `model.model_config` values -> model config
    hf_config_dict: Callable[[Any, str], Dict[str, Any]]  # (model config, torch_dtype) -> config.json dict
    parameter_specs: Callable[[Any], list]               # -> [ParameterSpec] in model order (MTP included)
    release_duplicates: Callable[[Any], Dict[str, str]]  # copy name -> native name it copies (HF release)
    parameter_counts: Callable[[Any], Dict[str, Any]]    # total/activated/... counts (planner, logs)
    describe: Callable[[Any], str]                       # one line naming the sizes (error messages)
    load_hf_weights: Callable[[Any, str], Dict[str, Any]]  # (model, HF directory) -> summary
    shard_table: ShardTable
    planning: Any = None                                 # plugin's planner hooks (see mindpretrain.planning)

    def parameter_shapes(self, model_config):
        """{name: shape} of every native parameter, in model order."""
        return {spec.name: tuple(spec.shape) for spec in self.parameter_specs(model_config)}


def register_spec(spec):
    """Register `spec` under its name (a plugin calls this on import). Returns the spec.

    The same plugin imported under two module paths (`research.deepseek3` and, via --register_path,
    `deepseek3`) registers an equal spec twice; the registry keeps the first."""
    if spec.name in registry.names(SPEC_KIND):
        existing = registry.get(SPEC_KIND, spec.name)
        if existing.config_class.__qualname__ != spec.config_class.__qualname__:
            raise registry.RegistryError(f"model spec {spec.name!r} is already registered for "
                                         f"{existing.config_class.__qualname__}")
        return existing
    registry.register(SPEC_KIND, spec.name)(spec)
    return spec


def spec_for_config(model_config):
    """The registered spec whose config class `model_config` is an instance of (by class identity or name)."""
    for name in registry.names(SPEC_KIND):
        spec = registry.get(SPEC_KIND, name)
        if isinstance(model_config, spec.config_class) or \
                type(model_config).__name__ == spec.config_class.__name__:
            return spec
    raise registry.RegistryError(
        f"no model spec is registered for {type(model_config).__name__} (registered: "
        f"{', '.join(registry.names(SPEC_KIND)) or 'none'}) — is its plugin passed with --register_path?")


def spec_for_model_type(model_type):
    """The registered spec reading HF `config.json` files of `model_type` (e.g. "deepseek_v3")."""
    for name in registry.names(SPEC_KIND):
        spec = registry.get(SPEC_KIND, name)
        if model_type in spec.model_types:
            return spec
    known = sorted(t for n in registry.names(SPEC_KIND) for t in registry.get(SPEC_KIND, n).model_types)
    raise registry.RegistryError(f"no model spec reads model_type {model_type!r} (known: {', '.join(known) or 'none'})"
                                 " — is its plugin passed with --register_path?")
