"""Expert-parallel bookkeeping without communication: the rank -> expert slice, the names a rank keeps, the
full-model shapes of a checkpoint, and the alltoall permutation + emulated AlltoAllV round trip."""
import numpy as np
import pytest

from mindpretrain.parallel.expert_groups import (ExpertLayout, check_runtime_support, expert_index,
                                                 full_model_shapes, keeps_parameter, rename_expert)
from mindpretrain.validation import ConfigError
from research.deepseek3.expert_parallel import (alltoall_round_trip, destination_ranks, emulated_alltoallv,
                                                permute_by_destination)


def test_layout_slices_groups_and_replicas():
    layout = ExpertLayout(16, expert_parallel=2, data_parallel=4, rank=3)
    assert list(layout.local_experts) == list(range(8, 16)) and layout.position == 1
    assert layout.ep_group_ranks() == (2, 3) and layout.replica_group_ranks() == (1, 3)
    with pytest.raises(ConfigError, match="expert_parallel"):
        ExpertLayout(16, expert_parallel=3, data_parallel=3)
    with pytest.raises(ConfigError, match="sub-groups"):
        check_runtime_support(layout, "CPU")
    with pytest.raises(ConfigError, match="allgather"):
        check_runtime_support(ExpertLayout(8, 2, 2, 0, "alltoall"), "CPU")


def test_names_kept_and_full_shapes():
    layout = ExpertLayout(4, expert_parallel=2, data_parallel=2, rank=1)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    assert expert_index(name) == 2 and expert_index("model.layers.1.mlp.shared_experts.up_proj.weight") is None
    assert keeps_parameter(layout, name) and not keeps_parameter(layout, rename_expert(name, 1))
    shapes = {"a.weight": (3,), name: (2, 2), rename_expert(name, 3): (2, 2)}
    full = full_model_shapes(shapes, layout)
    assert sorted(full) == sorted(["a.weight"] + [rename_expert(name, e) for e in range(4)])


def test_permutation_sorts_by_destination_and_inverts():
    destinations = np.array([1, 0, 2, 1, 0, 1])
    order, counts, inverse = permute_by_destination(destinations, 4)
    assert counts.tolist() == [2, 3, 1, 0]                       # rank 3 receives nothing
    assert destinations[order].tolist() == [0, 0, 1, 1, 1, 2] and order.tolist() == [1, 4, 0, 3, 5, 2]
    assert np.array_equal(np.arange(6)[order][inverse], np.arange(6))


def test_emulated_exchange_round_trips_exactly_with_uneven_counts():
    rng = np.random.RandomState(0)
    topk = [rng.randint(0, 4, (5, 2)), rng.randint(0, 4, (3, 2)), np.zeros((4, 2), np.int64)]
    topk[0][:] = np.where(topk[0] >= 2, 3, topk[0])               # no id reaches 4 or 5: rank 2 gets nothing
    destinations = [destination_ranks(idx, 6, 3) for idx in topk]  # 2 experts per rank
    tokens = [rng.standard_normal((d.size, 4)).astype(np.float32) for d in destinations]
    back = alltoall_round_trip(tokens, destinations)
    for original, returned in zip(tokens, back):
        assert np.array_equal(original, returned)
    # what a rank receives is exactly the rows destined to it, in source-rank order
    received = emulated_alltoallv([t[permute_by_destination(d, 3)[0]] for t, d in zip(tokens, destinations)],
                                  np.stack([permute_by_destination(d, 3)[1] for d in destinations]))
    for rank in range(3):
        expected = np.concatenate([t[d == rank] for t, d in zip(tokens, destinations)])
        assert np.array_equal(received[rank], expected)
    # an expert function applied on the receiving rank comes back to each source row
    scaled = alltoall_round_trip(tokens, destinations, expert_fn=lambda rank, rows: rows * (rank + 1))
    for t, d, s in zip(tokens, destinations, scaled):
        assert np.array_equal(s, t * (d + 1).reshape(-1, 1))
    assert received[2].shape == (0, 4)                             # the rank receiving zero tokens


def test_planner_expert_elements_per_device_equal_what_an_ep2_rank_builds():
    """The planner's routed-expert share per device (parallel/layouts.py) is the partition the model builds."""
    import mindspore as ms
    from mindpretrain.parallel.layouts import weight_layouts
    from mindpretrain.parallel.parallel_config import ParallelConfig
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
    from research.deepseek3.spec import SHARD_TABLE
    from research.deepseek3.weight_mapping import hf_parameter_shapes

    ms.set_context(mode=ms.PYNATIVE_MODE)
    config = DeepseekV3Config(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                              num_hidden_layers=3, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                              n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12,
                              qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, seq_length=8,
                              num_nextn_predict_layers=1, compute_dtype="float32")
    parallel = ParallelConfig.from_dict(dict(data_parallel=2, expert_parallel=2))
    placement = parallel.validate(config, parallel.device_num)
    layouts = weight_layouts(hf_parameter_shapes(config), parallel, placement, SHARD_TABLE)
    planned = sum(layout.numel_per_device for layout in layouts if expert_index(layout.name) is not None)
    for rank in (0, 1):
        config.expert_layout = ExpertLayout(8, expert_parallel=2, data_parallel=2, rank=rank)
        model = DeepseekV3ForCausalLM(config)
        built = sum(int(np.prod(p.shape)) for p in model.get_parameters() if expert_index(p.name) is not None)
        assert built == planned > 0
