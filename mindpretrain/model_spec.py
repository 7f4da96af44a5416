"""The contract between the core and a model plugin: everything the core may know about a model family.

The core (conversion, planning, parallel layouts, the trainer) never imports a plugin. A plugin such as
`research/deepseek3` builds one `ModelSpec` and registers it (`register_spec`) when it is imported; the core
then finds it from a model config (`spec_for_config`) or from a HuggingFace `config.json`'s `model_type`
(`spec_for_model_type`). A second model family plugs in by registering its own spec; no core file changes.
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from mindpretrain import registry

SPEC_KIND = "model_spec"


class ParameterSpec(NamedTuple):
    """One parameter of the native model. Native names are the HuggingFace checkpoint names.

    layer: index in the model's layer list (MTP layers after the main ones) or None; group: a plugin-defined
    family name (only the plugin interprets it, e.g. in its parameter counts); expert: routed expert index or
    None; trainable: False for tensors updated outside the optimizer (e.g. expert-score biases).
    """

    name: str
    shape: Tuple[int, ...]
    layer: Optional[int]
    group: str
    expert: Optional[int]
    trainable: bool


class DerivedTensor(NamedTuple):
    """A native tensor that a foreign weight layout stores differently (renamed, split, stacked, permuted).

    sources: the foreign names it is made of; derive(*arrays): the native tensor from the sources' arrays, by
    rearrangement only (indexing, reshape, transpose, concatenation), so it works on stored bits of any dtype
    and keeps bf16 bit for bit; it must pickle (a module-level function or a `functools.partial` of one),
    because conversion workers run it; shape: the native shape.
    """

    sources: Tuple[str, ...]
    derive: Callable[..., Any]
    shape: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """A layout in which another framework saves this model's weights, read by the HF loader and converter.

    detect(names) -> bool: whether a checkpoint with these tensor names is in this layout;
    translate(model_config, {name: shape}) -> (derived {native name: DerivedTensor}, unconsumed names,
    problems [str]): how each native tensor is made from the checkpoint's tensors; names that no native
    tensor reads (beyond those the layout knows to ignore, e.g. optimizer state) and sources of the wrong
    shape are returned for the caller to report; a native tensor whose sources are absent is left out.
    is_mtp(model_config, name) -> bool: whether a foreign name belongs to a multi-token-prediction module.
    """

    name: str
    detect: Callable[[Sequence[str]], bool]
    translate: Callable[..., Tuple[Dict[str, DerivedTensor], list, list]]
    is_mtp: Callable[[Any, str], bool]


class WeightsMismatchError(ValueError):
    """A weights directory does not fit the model; the message lists every problem (nothing was loaded)."""


@dataclasses.dataclass(frozen=True)
class ShardTable:
    """How a model's weights are split and which `.shard()` layout each of its op kinds assumes.

    weight_kinds: (kind, regex on the full parameter name, split symbol per dimension, routed expert?); a
    regex captures the layer index of layered weights in a group named `layer`;
    op_symbols: op kind -> per-input tuples of mesh symbols (see `mindpretrain.parallel.strategies`);
    matmul_ops: op kinds computed as `x [T, in] @ W[out, in]^T` whose strategy follows the weight kind;
    embedding_kinds / head_kinds: the kinds of unlayered weights that live on the first pipeline stage (and
    on the last one too when multi-token prediction reads them there) / on the last stage only;
    layout_ops: op kind -> (mesh ((axis, size symbol), ...), input axis names per dimension, output ones): ops
    sharded by a device-matrix Layout (see `mindpretrain.parallel.strategies.op_layout`).
    """

    weight_kinds: Tuple[Tuple[str, str, Tuple[Optional[str], ...], bool], ...]
    op_symbols: Mapping[str, Tuple[Tuple[Optional[str], ...], ...]]
    matmul_ops: Tuple[str, ...]
    embedding_kinds: Tuple[str, ...] = ("embedding",)
    head_kinds: Tuple[str, ...] = ("final_norm", "lm_head")
    layout_ops: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

    @property
    def op_kinds(self):
        return tuple(self.op_symbols) + tuple(self.layout_ops) + tuple(self.matmul_ops)

    @property
    def kind_splits(self):
        return {kind: split for kind, _, split, _ in self.weight_kinds}


ActivationTerm = Tuple[str, float, str]
"""(what, elements, dtype key): a tensor the planner counts. dtype key: "compute" (model_config.compute_dtype),
"norm" (layernorm_compute_type), "softmax" (softmax_compute_type) or "fp32"."""


@dataclasses.dataclass(frozen=True)
class PlanningHooks:
    """What the planner (`mindpretrain.planning.cost_model`) asks the plugin about its kernels, op by op.

    The core does the generic arithmetic (pipeline stages, optimizer sharding, dtype bytes, recompute,
    communication); these functions say which tensors the model's own ops keep and how many FLOPs a token
    costs, because only the plugin knows its attention and MoE implementation. `fused_kernels` selects the
    Ascend kernel set (flash attention, fused cross-entropy) over the model's reference ops (what runs on CPU).

    layer_activation_terms(model_config, parallel_config, layer, seq_length, fused_kernels, tokens):
        [ActivationTerm] per token that layer `layer` (MTP layers after the main ones) keeps for its backward,
        already divided by the split that applies to each; `tokens` is the micro-batch's tokens per device.
    selective_recompute_drops: names of those terms that the model's selective recompute re-materialises.
    head_activation_terms(model_config, parallel_config, fused_kernels):
        [ActivationTerm] per token the last stage keeps for its final norm and output head(s).
    backward_transient_terms(model_config, parallel_config, has_head, micro_batch_size, seq_length, fused_kernels):
        [ActivationTerm] in elements per micro-batch, one per phase of a stage's backward (the head's, one
        attention core's): temporaries alive during that phase on top of what is kept. The phases do not
        overlap, so the planner counts the largest (`has_head`: the stage holds the output head).
    flops_per_token(model_config, seq_length=None): training FLOPs (forward + backward) per token (MFU).
    """

    layer_activation_terms: Callable[..., Sequence[ActivationTerm]]
    selective_recompute_drops: Tuple[str, ...]
    head_activation_terms: Callable[..., Sequence[ActivationTerm]]
    backward_transient_terms: Callable[..., Sequence[ActivationTerm]]
    flops_per_token: Callable[..., float]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model family as the core sees it. Every callable takes the family's validated model config first.

    Fields are filled by the plugin; the core only calls them. `load_hf_weights(model, path,
    allow_missing_mtp=False)` raises `WeightsMismatchError` (or a subclass) when the directory does not fit;
    `allow_missing_mtp` accepts a directory without the multi-token-prediction layers (transformers saves
    none); it is called with `drop_mtp=True` only for a model without MTP (the checkpoint's MTP tensors are
    then skipped), so only plugins that set `without_mtp` need to accept it. `config_from_hf(path,
    **overrides)` takes training fields (seq_length, compute_dtype, ...) that config.json does not hold.
    Optional: `without_mtp(model_config)` the same model without multi-token prediction (None: the family
    has none); `foreign_layouts` other frameworks' names for the same weights (e.g. MindFormers');
    `hf_config_ignored` the config.json keys a YAML may set differently from the checkpoint it loads
    (`mindpretrain.checkpoint.hf_config_check`); `prepare_parallel(model, parallel_config)` adapts a built
    model to semi-auto parallelism before its primitives are sharded (e.g. per-shard kernel inputs); `cached_decoder(model, batch_size, max_length)` a KV-cached
    decoder of a built model with the interface of `mindpretrain.generation.sampling.CachedDecoder` (None: the
    family cannot generate text).
    """

    name: str                                            # e.g. "deepseek_v3"
    model_types: Tuple[str, ...]                         # HF config.json `model_type` values it reads
    config_class: type                                   # the registered model config class
    model_class: str                                     # registered model class (YAML `model.arch.type`)
    config_from_hf: Callable[..., Any]                   # HF directory (config.json), **overrides -> model config
    config_from_dict: Callable[[Dict[str, Any]], Any]    # YAML `model.model_config` values -> model config
    hf_config_dict: Callable[[Any, str], Dict[str, Any]]  # (model config, torch_dtype) -> config.json dict
    parameter_specs: Callable[[Any], list]               # -> [ParameterSpec] in model order (MTP included)
    release_duplicates: Callable[[Any], Dict[str, str]]  # copy name -> native name it copies (HF release)
    parameter_counts: Callable[[Any], Dict[str, Any]]    # total/activated/... counts (planner, logs)
    describe: Callable[[Any], str]                       # one line naming the sizes (error messages)
    load_hf_weights: Callable[..., Dict[str, Any]]       # (model, HF directory) -> summary
    shard_table: ShardTable
    planning: Optional[PlanningHooks] = None             # None: the planner and MFU are unavailable
    without_mtp: Optional[Callable[[Any], Any]] = None   # model config -> the same model without MTP
    foreign_layouts: Optional[Tuple[WeightLayout, ...]] = None   # other frameworks' weight names
    cached_decoder: Optional[Callable[..., Any]] = None  # (model, batch, max_length) -> decoder (generation)
    hf_config_ignored: Tuple[str, ...] = ()              # config.json keys that do not change what weights compute
    prepare_parallel: Optional[Callable[[Any, Any], None]] = None   # (model, parallel_config) before sharding

    def mtp_names(self, model_config):
        """(native MTP parameter names, MTP copies of the release layout): what `without_mtp` removes."""
        if self.without_mtp is None:
            return set(), set()
        lean = self.without_mtp(model_config)
        return (set(self.parameter_shapes(model_config)) - set(self.parameter_shapes(lean)),
                set(self.release_duplicates(model_config)) - set(self.release_duplicates(lean)))

    def foreign_layout_of(self, names):
        """The foreign layout whose names these are, or None (the native = HF layout)."""
        for layout in self.foreign_layouts or ():
            if layout.detect(names):
                return layout
        return None

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


def _registered_specs():
    return [registry.get(SPEC_KIND, name) for name in registry.names(SPEC_KIND)]


def _not_found(what, known):
    return registry.RegistryError(f"no model spec is registered for {what} (known: {', '.join(known) or 'none'})"
                                  " — is its plugin passed with --register_path?")


def spec_for_config(model_config):
    """The registered spec whose config class `model_config` is an instance of (by class identity or name)."""
    for spec in _registered_specs():
        if isinstance(model_config, spec.config_class) or \
                type(model_config).__name__ == spec.config_class.__name__:
            return spec
    raise _not_found(type(model_config).__name__, [spec.config_class.__name__ for spec in _registered_specs()])


def spec_for_config_type(type_name):
    """The registered spec of the config class named `type_name` (a YAML `model.model_config.type`)."""
    for spec in _registered_specs():
        if spec.config_class.__name__ == type_name:
            return spec
    raise _not_found(f"config type {type_name!r}", [spec.config_class.__name__ for spec in _registered_specs()])


def spec_for_model_type(model_type):
    """The registered spec reading HF `config.json` files of `model_type` (e.g. "deepseek_v3")."""
    for spec in _registered_specs():
        if model_type in spec.model_types:
            return spec
    raise _not_found(f"model_type {model_type!r}",
                     sorted(t for spec in _registered_specs() for t in spec.model_types))
