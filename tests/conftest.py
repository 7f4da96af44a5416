"""Shared fixtures: the ../shared material (skipped with a reason when absent) and small corpora."""
import importlib
import os
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
STRICT = os.environ.get("MINDPRETRAIN_STRICT_TESTS") == "1"


def pytest_configure(config):
    """Pick MindSpore's device once, before any test runs a kernel.

    `mindspore.set_device` refuses to run after the runtime has started, but accepts a repeat of
    the same choice; choosing CPU here lets every test (and the trainer's own context set-up, run
    in-process) call it again without depending on which test happened to run first.
    """
    import mindspore

    mindspore.set_device("CPU")


def load_tool(name):
    """tools/<name>.py as a module (the tools are scripts, not a package), a fresh copy per call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tools_{name}", PROJECT_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_path(*parts):
    """A file under ../shared, or a skip saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (the ../shared folder beside the project provides it)")
    return path


def require_reference(module):
    """Import a test-only reference implementation; in strict runs (CI) its absence is a failure."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if STRICT:
            raise
        pytest.skip(f"reference implementation {module} is not installed ({error}); "
                    "bash scripts/run_tests.sh installs it")


def packed_tiny_config(seq_length):
    """DeepseekV3Config keywords of the packed-attention tests: 2 layers (dense, MoE), YaRN, MTP, float32."""
    return dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, seq_length=seq_length, compute_dtype="float32", initializer_range=0.2,
                num_nextn_predict_layers=1, seq_balance_loss_alpha=0.01,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})


STANDIN_MODEL = PROJECT_ROOT / "tests" / "standin_model"
STANDIN_VOCAB = 256


@pytest.fixture(scope="module")
def standin_graph_mode():
    """GRAPH mode with the stand-in model registered: the trainer tests' model, cheap to compile."""
    import mindspore

    import mindpretrain.data.loader  # noqa: F401  (registers the data loader)
    import mindpretrain.training  # noqa: F401  (registers the optimizer and LR schedules)
    from mindpretrain import registry

    registry.import_register_path(str(STANDIN_MODEL))
    mindspore.set_context(mode=mindspore.GRAPH_MODE)


@pytest.fixture(scope="module")
def standin_corpus(tmp_path_factory):
    """A synthetic BIN dataset of STANDIN_VOCAB tokens for the trainer tests."""
    folder = tmp_path_factory.mktemp("data")
    return write_dataset(folder / "synthetic", random_documents(7, 60, max_length=300, vocab=STANDIN_VOCAB,
                                                                allow_empty=False))


@pytest.fixture(scope="session")
def wikitext_valid():
    return shared_path("data", "wikitext-2", "valid.txt")


@pytest.fixture(scope="session")
def deepseek_tokenizer_json():
    return shared_path("data", "deepseek-v3-tokenizer", "tokenizer.json")


def random_documents(seed, count, max_length=40, vocab=1000, allow_empty=True):
    rng = np.random.RandomState(seed)
    low = 0 if allow_empty else 1
    return [rng.randint(0, vocab, size=rng.randint(low, max_length + 1)) for _ in range(count)]


def write_dataset(prefix, documents, dtype=np.int32):
    from mindpretrain.data.indexed_dataset import IndexedDatasetBuilder

    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for document in documents:
            builder.add_document(document)
    return str(prefix)


def random_chat_documents(seed, count, lengths, vocab, bos=1, first_target=1):
    """[(int32 tokens, uint8 target mask)] of SFT documents: BOS then random tokens of [2, vocab), lengths drawn
    from `lengths` (low, high), the targets a suffix starting at or after `first_target` (the "answer")."""
    rng = np.random.RandomState(seed)
    documents = []
    for _ in range(count):
        length = int(rng.randint(*lengths))
        mask = np.zeros(length, np.uint8)
        mask[int(rng.randint(first_target, length)):] = 1
        documents.append((np.concatenate(([bos], rng.randint(2, vocab, length - 1))).astype(np.int32), mask))
    return documents


def write_sft_dataset(prefix, documents):
    """An SFT prefix as tools/preprocess_sft_data.py writes it, from [(int32 tokens, uint8 target mask), ...]."""
    write_dataset(f"{prefix}_input_ids_document", [tokens for tokens, _ in documents], np.int32)
    write_dataset(f"{prefix}_loss_mask_document", [mask for _, mask in documents], np.uint8)
    return str(prefix)


def write_mindrecord(path, records, shard_num=1):
    """MindRecord file(s) of int32 columns, as MindFormers' finetune preprocessing writes them; returns the first."""
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), shard_num=shard_num, overwrite=True)
    schema = {name: {"type": "int32", "shape": [-1]} for name in records[0]}
    writer.add_schema(schema, "finetune")
    writer.write_raw_data(records)
    writer.commit()
    return str(path) + ("0" if shard_num > 1 else "")
