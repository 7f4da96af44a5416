"""Packed SFT rows through DeepSeek-V3: documents packed into one row must behave as if each ran alone.

References: each document run alone in a row of its own (the unpacked path, already checked against transformers
by test_deepseek3_reference.py), transformers' DeepseekV3 given an explicit 4-D block-diagonal mask and
position_ids, and NumPy reconstructions of the row layout and of which MTP positions count. The rows are built
here from the SFT data contract (labels / loss_mask / position_ids / actual_seq_len), independently of the
dataset code.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from mindpretrain.validation import ConfigError
from research.deepseek3.deepseek3_config import DeepseekV3Config
from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM
from research.deepseek3.mla import AttentionCore, RecomputingAttentionCore, document_causal_mask, document_ids
from conftest import packed_tiny_config, require_reference

SEQ = 24
TINY = packed_tiny_config(SEQ)
LENGTHS = (9, 7, 11)          # row 0 packs documents 0 and 1 (16 of 24 positions), row 1 holds document 2
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def pynative_cpu():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")


# ---------------------------------------------------------------------------------------------------------------
# rows per the SFT data contract (NumPy, independent of the dataset code)
# ---------------------------------------------------------------------------------------------------------------

def random_documents(vocab, seed=0, lengths=LENGTHS):
    """(token ids, target mask) per document; token 0 is never a target (BOS), the rest at random."""
    rng = np.random.RandomState(seed)
    documents = []
    for length in lengths:
        ids = rng.randint(1, vocab, length).astype(np.int32)
        targets = (rng.rand(length) > 0.3).astype(np.float32)
        targets[0] = 0.0
        documents.append((ids, targets))
    return documents


def contract_row(documents, seq_length, pad_id=0):
    """The five columns of one row holding `documents` back to back, then padding."""
    ids = np.full(seq_length, pad_id, np.int32)
    labels = np.full(seq_length, -100, np.int32)
    loss_mask = np.zeros(seq_length, np.float32)
    positions = np.zeros(seq_length, np.int32)
    ends, offset = [], 0
    for tokens, targets in documents:
        length = len(tokens)
        ids[offset:offset + length] = tokens
        labels[offset:offset + length - 1] = tokens[1:]
        loss_mask[offset:offset + length - 1] = targets[1:]
        positions[offset:offset + length] = np.arange(length)
        offset += length
        ends.append(offset)
    actual = np.array(ends + [ends[-1]] * (seq_length - len(ends)), np.int32)
    return ids, labels, loss_mask, positions, actual


def batch_of(rows):
    """Stack rows' columns into Tensors [B, S] (ids, labels, loss_mask, position_ids, actual_seq_len)."""
    return tuple(Tensor(np.stack(column)) for column in zip(*rows))


def brute_force_documents(actual_seq_len, seq_length):
    """Document id of every position as the contract defines it: how many entries of actual_seq_len are <= p
    (padding, past the repeated last end, gets one id of its own)."""
    out = np.zeros((len(actual_seq_len), seq_length), np.int64)
    for row, ends in enumerate(actual_seq_len):
        for position in range(seq_length):
            out[row, position] = sum(1 for end in ends if end <= position)
    return out


def mtp_target_positions(documents_np, loss_mask, depth):
    """Which positions count at MTP depth k: i, i+k in one document and loss_mask[i+k] = 1 (the token at
    i+k+1 is a target of that document)."""
    seq_length = loss_mask.shape[-1]
    counted = np.zeros_like(loss_mask)
    for i in range(seq_length - depth):
        same = documents_np[:, i] == documents_np[:, i + depth]
        counted[:, i] = same * loss_mask[:, i + depth]
    return counted


def as_floats(outputs):
    return [float(item.asnumpy()) for item in outputs[:4]] + [outputs[4].asnumpy()]


# ---------------------------------------------------------------------------------------------------------------
# fixtures: one model, the packed batch and every document alone
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    ms.set_seed(7)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))


@pytest.fixture(scope="module")
def documents():
    return random_documents(TINY["vocab_size"])


@pytest.fixture(scope="module")
def packed(documents):
    return batch_of([contract_row(documents[:2], SEQ), contract_row(documents[2:], SEQ)])


def alone(document):
    """One document as an exact-length row of its own, unpacked: (ids, labels, loss_mask) [1, L]."""
    ids, labels, loss_mask, _, _ = contract_row([document], len(document[0]))
    return Tensor(ids[None]), Tensor(labels[None]), Tensor(loss_mask[None])


@pytest.fixture(scope="module")
def separate(model, documents):
    """Per document: outputs, logits, LM and MTP target counts of the document run alone."""
    results = []
    for document in documents:
        ids, labels, loss_mask = alone(document)
        mask = loss_mask.asnumpy()
        results.append(dict(outputs=as_floats(model(ids, labels, loss_mask)), logits=model(ids).asnumpy()[0],
                            lm_targets=mask.sum(), mtp_targets=mask[:, 1:].sum()))
    return results


# ---------------------------------------------------------------------------------------------------------------
# the layout helpers against brute force
# ---------------------------------------------------------------------------------------------------------------

def test_document_ids_and_mask_match_brute_force(packed):
    actual = packed[4].asnumpy()
    documents_np = brute_force_documents(actual, SEQ)
    np.testing.assert_array_equal(document_ids(packed[4], SEQ).asnumpy(), documents_np)
    mask = document_causal_mask(document_ids(packed[4], SEQ)).asnumpy()
    assert mask.shape == (2, 1, SEQ, SEQ)
    for row in range(2):
        for i in range(SEQ):
            for j in range(SEQ):
                allowed = j <= i and documents_np[row, i] == documents_np[row, j]
                assert mask[row, 0, i, j] == (0.0 if allowed else -1.0e9)


def test_rope_reads_each_rows_position_ids(model, packed):
    """RoPE scores depend on position differences only, so logits cannot show whether positions restart per
    document: the tables handed to the blocks are checked instead (row r, position p -> table[position_ids])."""
    from research.deepseek3.rope import rope_tables

    cos, sin, mask, _ = model.model.positional(SEQ, packed[3], packed[4])
    table_cos, table_sin = rope_tables(model.model_config, SEQ)
    positions = packed[3].asnumpy()
    assert cos.shape == (2, 1, SEQ, model.model_config.qk_rope_head_dim // 2) and mask.shape == (2, 1, SEQ, SEQ)
    np.testing.assert_array_equal(cos.asnumpy()[:, 0], table_cos[positions])
    np.testing.assert_array_equal(sin.asnumpy()[:, 0], table_sin[positions])
    assert positions[0, LENGTHS[0]] == 0 and positions[1, LENGTHS[2]] == 0       # restarts, and padding at 0


# ---------------------------------------------------------------------------------------------------------------
# packed == each document alone
# ---------------------------------------------------------------------------------------------------------------

def test_packed_losses_equal_the_token_weighted_documents_alone(model, packed, separate):
    loss, lm_loss, mtp_loss, _, _ = as_floats(model(*packed))
    lm_weights = np.array([item["lm_targets"] for item in separate])
    mtp_weights = np.array([item["mtp_targets"] for item in separate])
    expected_lm = (lm_weights * [item["outputs"][1] for item in separate]).sum() / lm_weights.sum()
    expected_mtp = (mtp_weights * [item["outputs"][2] for item in separate]).sum() / mtp_weights.sum()
    assert abs(lm_loss - expected_lm) <= TOLERANCE
    assert abs(mtp_loss - expected_mtp) <= TOLERANCE
    # the same documents, each padded to a full row of its own (packed path, one document per row)
    single_rows = batch_of([contract_row([document], SEQ) for document in random_documents(TINY["vocab_size"])])
    _, lm_single, mtp_single, _, _ = as_floats(model(*single_rows))
    assert abs(lm_single - expected_lm) <= TOLERANCE and abs(mtp_single - expected_mtp) <= TOLERANCE


def test_packed_logits_equal_each_document_alone(model, packed, separate):
    logits = model(packed[0], position_ids=packed[3], actual_seq_len=packed[4]).asnumpy()
    assert logits.shape == (2, SEQ, TINY["vocab_size"])
    spans = [(0, 0, LENGTHS[0]), (0, LENGTHS[0], LENGTHS[0] + LENGTHS[1]), (1, 0, LENGTHS[2])]
    for (row, start, end), item in zip(spans, separate):
        np.testing.assert_allclose(logits[row, start:end], item["logits"], rtol=0, atol=TOLERANCE)


def test_plain_causal_mask_on_the_packed_row_differs(model, packed, separate):
    """The check above can fail: without the document inputs the second document sees the first."""
    lm_weights = np.array([item["lm_targets"] for item in separate])
    expected_lm = (lm_weights * [item["outputs"][1] for item in separate]).sum() / lm_weights.sum()
    lm_plain = float(model(packed[0], packed[1], packed[2])[1].asnumpy())
    assert abs(lm_plain - expected_lm) > 1e-3
    logits = model(packed[0]).asnumpy()
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert np.abs(logits[0, second] - separate[1]["logits"]).max() > 1e-2


def test_packing_inputs_come_together(model, packed):
    with pytest.raises(ValueError, match="both position_ids and actual_seq_len"):
        model(packed[0], packed[1], packed[2], position_ids=packed[3])
    with pytest.raises(ValueError, match="both position_ids and actual_seq_len"):
        model(packed[0], actual_seq_len=packed[4])


# ---------------------------------------------------------------------------------------------------------------
# padding, MTP boundaries, loss reduction
# ---------------------------------------------------------------------------------------------------------------

def test_padding_changes_neither_expert_load_nor_balance_loss(model, documents, separate):
    # one document + padding (pad id 0, what the MTP block's zero-filled tail reads too): every MoE block
    padded = model(*batch_of([contract_row(documents[2:], SEQ)]))
    _, lm_loss, mtp_loss, balance, load = as_floats(padded)
    _, lm_alone, mtp_alone, balance_alone, load_alone = separate[2]["outputs"]
    np.testing.assert_array_equal(load, load_alone)
    assert load.sum() == LENGTHS[2] * TINY["num_experts_per_tok"] * len(load)        # padding not counted
    assert balance_alone > 0 and abs(balance - balance_alone) <= 1e-6 * balance_alone
    assert abs(lm_loss - lm_alone) <= TOLERANCE and abs(mtp_loss - mtp_alone) <= TOLERANCE
    # several documents and a non-zero pad id: the main MoE blocks count the documents' tokens only
    rows = [contract_row(documents[:2], SEQ, pad_id=5), contract_row(documents[2:], SEQ, pad_id=5)]
    load = model(*batch_of(rows))[4].asnumpy()
    main_blocks = len(load) - TINY["num_nextn_predict_layers"]
    expected = sum(item["outputs"][4] for item in separate)
    np.testing.assert_array_equal(load[:main_blocks], expected[:main_blocks])


class _MaskSpy:
    """Wraps the head's masked_cross_entropies (one call: main, then each MTP depth) to record the weights of
    each of its losses (PyNative only)."""

    def __init__(self, head):
        self.original = head.masked_cross_entropies
        self.masks = []

    def __call__(self, segments, reduction="mean"):
        self.masks.extend(loss_mask.asnumpy() for _, _, loss_mask in segments)
        return self.original(segments, reduction)


def test_mtp_targets_across_a_document_boundary_are_excluded():
    ms.set_seed(3)
    deep = DeepseekV3ForCausalLM(DeepseekV3Config(**dict(TINY, num_nextn_predict_layers=2)))
    documents = random_documents(TINY["vocab_size"], seed=4)
    packed = batch_of([contract_row(documents[:2], SEQ), contract_row(documents[2:], SEQ)])
    spy = _MaskSpy(deep.lm_head)
    deep.lm_head.masked_cross_entropies = spy
    try:
        deep.set_loss_reduction("sum")
        mtp_packed = float(deep(*packed)[2].asnumpy())
        mtp_alone = sum(float(deep(*alone(document))[2].asnumpy()) for document in documents)
    finally:
        del deep.lm_head.masked_cross_entropies
        deep.set_loss_reduction("mean")
    documents_np = brute_force_documents(packed[4].asnumpy(), SEQ)
    for depth in (1, 2):
        expected = mtp_target_positions(documents_np, packed[2].asnumpy(), depth)
        np.testing.assert_array_equal(spy.masks[depth], expected)
        # a boundary target exists that a plain shift would have counted
        assert (np.roll(packed[2].asnumpy(), -depth, 1)[:, :-depth] > expected[:, :-depth]).any()
    # summed losses add up over documents only when no cross-document target is counted
    assert abs(mtp_packed - mtp_alone) <= TOLERANCE * max(1.0, abs(mtp_alone))


def test_sum_reduction_is_mean_times_targets(model, packed):
    _, lm_mean, mtp_mean, _, _ = as_floats(model(*packed))
    model.set_loss_reduction("sum")
    try:
        loss, lm_sum, mtp_sum, balance, _ = as_floats(model(*packed))
    finally:
        model.set_loss_reduction("mean")
    documents_np = brute_force_documents(packed[4].asnumpy(), SEQ)
    mtp_targets = mtp_target_positions(documents_np, packed[2].asnumpy(), 1).sum()
    lm_targets = packed[2].asnumpy().sum()
    assert abs(lm_sum - lm_mean * lm_targets) <= TOLERANCE * lm_targets
    assert abs(mtp_sum - mtp_mean * mtp_targets) <= TOLERANCE * mtp_targets
    assert abs(loss - (lm_sum + model.mtp_loss_factor * mtp_sum + balance)) <= 1e-4
    with pytest.raises(ConfigError, match=r"loss_reduction \('token'\) must be one of \('mean', 'sum'\)"):
        model.set_loss_reduction("token")
    assert model.loss_reduction == "mean"


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------

class _LossOf(nn.Cell):
    """lm_loss + mtp_loss of the wrapped model (no balance loss: it is per row, not a sum over documents)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def construct(self, *inputs):
        outputs = self.network(*inputs)
        return outputs[1] + outputs[2]


def _gradients(model, inputs):
    weights = model.trainable_params()
    value, grads = ms.value_and_grad(_LossOf(model), None, weights)(*inputs)
    return float(value.asnumpy()), [grad.asnumpy() for grad in grads]


def test_packed_gradients_equal_the_sum_over_documents(model, packed, documents):
    """Per-token loss as the trainer runs it: sum reduction, loss mask divided by the global target count."""
    total = float(packed[2].asnumpy().sum())
    model.set_loss_reduction("sum")
    try:
        scaled = packed[:2] + (Tensor(packed[2].asnumpy() / total),) + packed[3:]
        value, grads = _gradients(model, scaled)
        expected_value, expected = 0.0, None
        for document in documents:
            ids, labels, loss_mask = alone(document)
            part_value, part = _gradients(model, (ids, labels, Tensor(loss_mask.asnumpy() / total)))
            expected_value += part_value
            expected = part if expected is None else [a + b for a, b in zip(expected, part)]
    finally:
        model.set_loss_reduction("mean")
    assert abs(value - expected_value) <= TOLERANCE
    checked = 0
    for param, actual, reference in zip(model.trainable_params(), grads, expected):
        np.testing.assert_allclose(actual, reference, rtol=0, atol=TOLERANCE, err_msg=param.name)
        checked += np.abs(reference).max() > 1e-3
    assert checked > len(grads) // 2                 # the comparison is mostly not between zeros


def test_recomputing_attention_core_gradients_with_the_document_mask():
    """The CPU core's hand-written backward against autodiff of the same forward, under the per-row
    block-diagonal mask (the causal case is in test_deepseek3_model.py)."""
    model_config = DeepseekV3Config(**TINY)
    rng = np.random.RandomState(12)
    heads = model_config.num_attention_heads
    query, key = (Tensor(rng.randn(2, heads, SEQ, model_config.qk_head_dim).astype(np.float32)) for _ in range(2))
    value = Tensor(rng.randn(2, heads, SEQ, model_config.v_head_dim).astype(np.float32))
    weights = Tensor(rng.randn(2, heads, SEQ, model_config.v_head_dim).astype(np.float32))
    actual = np.array([[5, 12, 12] + [12] * (SEQ - 3), [3, 4, 20] + [20] * (SEQ - 3)], np.int32)
    mask = document_causal_mask(document_ids(Tensor(actual), SEQ))
    results = []
    for core in (AttentionCore(model_config), RecomputingAttentionCore(model_config)):
        def objective(q, k, v, core=core):
            return (core(q, k, v, mask) * weights).sum()

        value_out, grads = ms.value_and_grad(objective, grad_position=(0, 1, 2))(query, key, value)
        results.append((float(value_out.asnumpy()), [grad.asnumpy() for grad in grads]))
    (reference, reference_grads), (value_out, grads) = results
    assert value_out == pytest.approx(reference, rel=1e-6)
    for name, expected, got in zip(("query", "key", "value"), reference_grads, grads):
        assert np.abs(expected).max() > 1e-2, name
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# GRAPH mode and transformers
# ---------------------------------------------------------------------------------------------------------------

class _TrainOutputs(nn.Cell):
    """The trainer's shape of call: a fixed tuple of tensors in, the 5 outputs and the gradients of loss out."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.grad = ms.value_and_grad(_LossOf(network), None, network.trainable_params())

    def construct(self, input_ids, labels, loss_mask, position_ids, actual_seq_len):
        outputs = self.network(input_ids, labels, loss_mask, position_ids, actual_seq_len)
        _, grads = self.grad(input_ids, labels, loss_mask, position_ids, actual_seq_len)
        return outputs, grads


def test_graph_mode_equals_pynative_with_recompute(packed):
    ms.set_seed(9)
    network = DeepseekV3ForCausalLM(DeepseekV3Config(**dict(TINY, recompute=["full", "selective", "full"])))
    step = _TrainOutputs(network)
    eager_outputs, eager_grads = step(*packed)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_outputs, graph_grads = step(*packed)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    for eager, graph in zip(eager_outputs, graph_outputs):
        np.testing.assert_allclose(graph.asnumpy(), eager.asnumpy(), rtol=1e-5, atol=1e-6)
    for eager, graph in zip(eager_grads, graph_grads):
        np.testing.assert_allclose(graph.asnumpy(), eager.asnumpy(), rtol=1e-4, atol=1e-6)


def _hf_block_mask(actual_seq_len, seq_length):
    """transformers' additive 4-D mask [B, 1, S, S] for the packed rows, from the brute-force document ids."""
    documents_np = brute_force_documents(actual_seq_len, seq_length)
    causal = np.tril(np.ones((seq_length, seq_length), bool))
    allowed = (documents_np[:, :, None] == documents_np[:, None, :]) & causal[None]
    return np.where(allowed, 0.0, -1.0e9).astype(np.float32)[:, None]


def test_packed_rows_match_transformers_with_a_4d_mask(tmp_path):
    torch = require_reference("torch")
    require_reference("transformers")
    from hf_reference import build_tiny_hf_deepseek_v3
    from research.deepseek3.hf_weights import load_hf_weights

    hf, hf_dir = build_tiny_hf_deepseek_v3(tmp_path)
    ours = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf(hf_dir, compute_dtype="float32", seq_length=SEQ,
                                                          seq_balance_loss_alpha=0.0))
    load_hf_weights(ours, hf_dir)
    documents = random_documents(hf.config.vocab_size, seed=5)
    ids, labels, loss_mask, positions, actual = (column.asnumpy() for column in batch_of(
        [contract_row(documents[:2], SEQ), contract_row(documents[2:], SEQ)]))
    hf_labels = np.full(ids.shape, -100, np.int64)               # transformers shifts: label of p is ids[p]
    hf_labels[:, 1:][loss_mask[:, :-1] > 0] = ids[:, 1:][loss_mask[:, :-1] > 0]
    with torch.no_grad():
        reference = hf(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(_hf_block_mask(actual, SEQ)),
                       position_ids=torch.as_tensor(positions, dtype=torch.long),
                       labels=torch.as_tensor(hf_labels), use_cache=False)
    logits = ours(Tensor(ids), position_ids=Tensor(positions), actual_seq_len=Tensor(actual)).asnumpy()
    assert np.abs(logits - reference.logits.numpy()).max() <= 1e-4
    lm_loss = float(ours(Tensor(ids), Tensor(labels), Tensor(loss_mask), Tensor(positions), Tensor(actual))[1]
                    .asnumpy())
    assert abs(lm_loss - reference.loss.item()) <= 1e-4
    # and the reference does see the documents apart: a plain causal mask gives other logits
    with torch.no_grad():
        causal = hf(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.numpy()
    assert np.abs(causal - reference.logits.numpy()).max() > 1e-2
