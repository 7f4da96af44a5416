"""Which routed experts a rank holds under expert parallelism, and which ranks it exchanges tokens with; and the
names of routed experts stored stacked ([E, out, in], for semi-auto parallel) against the HF per-expert names.

The one source of truth for the rank -> expert slice: the model builds only its slice's expert Parameters
(keeping the HF names with GLOBAL expert indices), the name/shape check and the checkpoint gather read the
same `ExpertLayout`. Layout (MindFormers / Megatron): the data-parallel ranks are cut into dp/ep consecutive
expert-parallel groups of ep ranks; rank r sits at position ``r % ep`` of group ``r // ep`` and holds experts
``[pos * E/ep, (pos + 1) * E/ep)``; the ranks at the same position of every group hold the same experts
(the replicas whose expert gradients are averaged). Pure Python: importable without MindSpore.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

from mindpretrain.validation import require

DISPATCHER_TYPES = ("allgather", "alltoall")


@dataclass(frozen=True)
class ExpertLayout:
    """This rank's share of the routed experts: ``num_experts`` in all, ``expert_parallel`` ranks per group."""
    num_experts: int
    expert_parallel: int = 1
    data_parallel: int = 1
    rank: int = 0
    dispatcher: str = "allgather"

    def __post_init__(self):
        ep, dp = self.expert_parallel, self.data_parallel
        require(ep >= 1, "parallel_config.expert_parallel", ep, "must be >= 1")
        require(dp % ep == 0, "parallel_config.expert_parallel", ep,
                f"must divide the data-parallel ranks ({dp})")
        require(self.num_experts % ep == 0, "parallel_config.expert_parallel", ep,
                f"must divide n_routed_experts ({self.num_experts})")
        require(0 <= self.rank < dp, "rank", self.rank, f"must be in [0, {dp})")
        require(self.dispatcher in DISPATCHER_TYPES, "moe_config.moe_token_dispatcher_type", self.dispatcher,
                f"must be one of {DISPATCHER_TYPES}")

    @property
    def experts_per_rank(self):
        return self.num_experts // self.expert_parallel

    @property
    def position(self):
        """This rank's place in its expert-parallel group (which slice it holds)."""
        return self.rank % self.expert_parallel

    @property
    def first_expert(self):
        return self.position * self.experts_per_rank

    @property
    def local_experts(self):
        """Global indices of the experts this rank holds."""
        return range(self.first_expert, self.first_expert + self.experts_per_rank)

    @property
    def partitioned(self):
        return self.expert_parallel > 1

    def holds(self, expert):
        return self.first_expert <= expert < self.first_expert + self.experts_per_rank

    def ep_group_ranks(self):
        """The ranks this rank exchanges tokens with (its expert-parallel group), in position order."""
        start = self.rank - self.position
        return tuple(range(start, start + self.expert_parallel))

    def replica_group_ranks(self):
        """The ranks holding the same experts as this one (one per expert-parallel group)."""
        return tuple(range(self.position, self.data_parallel, self.expert_parallel))

    def owner_of(self, expert):
        """Position (within an expert-parallel group) of the rank holding `expert`."""
        return expert // self.experts_per_rank


@dataclass(frozen=True)
class ExpertExchange:
    """A device's place in the dropless expert exchange under semi-auto parallel (MindFormers' MoEV3 layout):
    the dp x mp devices of a stage are cut into groups of ``expert_parallel`` consecutive devices, this one at
    ``position`` holding experts [position * E/ep, (position + 1) * E/ep); the stage's tokens are split into
    ``token_shards`` (dp x mp) shards, one per device; ``group`` names the communication group of
    ``group_ranks`` (None when ep is 1: nothing is exchanged)."""
    expert_parallel: int
    position: int = 0
    group: Optional[str] = None
    group_ranks: Tuple[int, ...] = (0,)
    token_shards: int = 1


def semi_auto_exchange(parallel_config, rank):
    """The `ExpertExchange` of global `rank` under `parallel_config` (stages hold dp x mp consecutive ranks)."""
    ep, per_stage = parallel_config.expert_parallel, parallel_config.devices_per_stage
    require(per_stage % ep == 0, "parallel_config.expert_parallel", ep,
            f"must divide data_parallel x model_parallel ({per_stage})")
    position = rank % per_stage % ep
    ranks = tuple(range(rank - position, rank - position + ep))
    group = None if ep == 1 else f"expert_exchange_{ranks[0]}_{ep}"
    return ExpertExchange(ep, position, group, ranks, per_stage)


def expert_index(parameter_name):
    """The global expert index of a routed-expert parameter name (``...mlp.experts.{e}.<proj>.weight``), else None."""
    parts = parameter_name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part == "experts" and index > 0 and parts[index - 1] == "mlp" and parts[index + 1].isdigit():
            return int(parts[index + 1])
    return None


def _stacked_position(parts):
    """Index of `experts` in a STACKED routed-expert name (``...mlp.experts.<proj>.weight``, every expert in one
    [E, out, in] tensor, as semi-auto parallel needs to split it by ep), else None."""
    for index, part in enumerate(parts[:-2]):
        if part == "experts" and index > 0 and parts[index - 1] == "mlp" and not parts[index + 1].isdigit():
            return index
    return None


def is_stacked(parameter_name):
    return _stacked_position(parameter_name.split(".")) is not None


def per_expert_name(stacked_name, expert):
    """The HF name of one expert's slice of a stacked routed-expert tensor."""
    parts = stacked_name.split(".")
    index = _stacked_position(parts)
    if index is None:
        raise ValueError(f"{stacked_name} is not a stacked routed-expert name")
    return ".".join(parts[:index + 1] + [str(expert)] + parts[index + 1:])


def unstacked_shapes(shapes):
    """{name: shape} with every stacked [E, ...] entry replaced by its E per-expert [...] entries."""
    full = {}
    for name, shape in shapes.items():
        if is_stacked(name):
            for expert in range(shape[0]):
                full[per_expert_name(name, expert)] = tuple(shape[1:])
        else:
            full[name] = tuple(shape)
    return full


def model_arrays(parameter_shapes, checkpoint_arrays, layout=None):
    """{model parameter name: array} from HF-named checkpoint arrays: this rank's experts only (a split
    layout), stacked parameters stacked from their experts' slices. Names missing from the checkpoint are left
    out (the caller's shape check has already said whether that is allowed)."""
    import numpy as np

    arrays = {}
    for name, shape in parameter_shapes.items():
        if is_stacked(name):
            slices = [per_expert_name(name, expert) for expert in range(shape[0])]
            if all(item in checkpoint_arrays for item in slices):
                arrays[name] = np.stack([checkpoint_arrays[item] for item in slices])
        elif name in checkpoint_arrays and keeps_parameter(layout, name):
            arrays[name] = checkpoint_arrays[name]
    return arrays


def keeps_parameter(layout, parameter_name):
    """True when this rank holds the parameter: every non-expert one, and its own slice's experts."""
    expert = expert_index(parameter_name)
    return layout is None or expert is None or layout.holds(expert)


def check_runtime_support(layout, device_target):
    """On CPU the data-parallel runtime uses the world group only (no sub-groups, no AlltoAll): ep must be 1 or
    equal to dp there, and the dispatcher must be allgather."""
    if layout is None or not layout.partitioned or str(device_target).upper() == "ASCEND":
        return
    require(layout.expert_parallel == layout.data_parallel, "parallel_config.expert_parallel",
            layout.expert_parallel, f"must be 1 or equal data_parallel ({layout.data_parallel}) on "
            f"{device_target}: expert-parallel sub-groups are not supported there")
    require(layout.dispatcher == "allgather", "moe_config.moe_token_dispatcher_type", layout.dispatcher,
            f"must be allgather on {device_target}: AlltoAll does not exist there")


def default_dispatcher(device_target):
    """Megatron's ``moe_token_dispatcher_type``: alltoall on Ascend, allgather elsewhere (CPU has no AlltoAll)."""
    return "alltoall" if str(device_target).upper() == "ASCEND" else "allgather"


def rename_expert(parameter_name, expert):
    """The same routed-expert parameter name for global expert `expert`."""
    parts = parameter_name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part == "experts" and index > 0 and parts[index - 1] == "mlp" and parts[index + 1].isdigit():
            parts[index + 1] = str(expert)
            return ".".join(parts)
    raise ValueError(f"{parameter_name} is not a routed-expert parameter name")


def full_model_shapes(shapes, layout):
    """{name: shape} of this rank's tensors -> the same for the whole model (every expert), in a stable order:
    what a layout-independent checkpoint holds."""
    shapes = unstacked_shapes(shapes)
    if layout is None or not layout.partitioned:
        return shapes
    full = {}
    for name, shape in shapes.items():
        expert = expert_index(name)
        if expert is None:
            full[name] = shape
        elif expert == layout.first_expert:
            for other in range(layout.num_experts):
                full[rename_expert(name, other)] = shape
    return full


def gather_full_tensors(tensors, layout):
    """{name: Parameter or array} of this rank -> {name: numpy array} of the whole model (every expert).

    A collective: every rank of the expert-parallel group must call it with its tensors in the same order
    (structurally identical models do). The i-th local expert of each group position is gathered in one
    AllReduce of a zero-padded [ep, ...] buffer (the collective every backend has)."""
    import numpy as np

    arrays = {}
    for name, value in tensors.items():
        array = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        if is_stacked(name):            # HF names, one tensor per expert
            arrays.update((per_expert_name(name, expert), array[expert]) for expert in range(array.shape[0]))
        else:
            arrays[name] = array
    if layout is None or not layout.partitioned:
        return arrays
    from mindspore import Tensor, ops
    all_reduce = ops.AllReduce()
    full = {}
    for name, array in arrays.items():
        expert = expert_index(name)
        if expert is None:
            full[name] = array
            continue
        buffer = np.zeros((layout.expert_parallel,) + array.shape, array.dtype)
        buffer[layout.position] = array
        summed = all_reduce(Tensor(buffer)).asnumpy()
        offset = expert - layout.first_expert
        for position in range(layout.expert_parallel):
            full[rename_expert(name, position * layout.experts_per_rank + offset)] = summed[position]
    return full
