"""Check a fine-tuned model's HF export: what vLLM will serve must be what was trained, on the data's tokenizer.

    python tools/check_sft_export.py --native output/sft/checkpoint/step_00000100 --hf output/sft/hf \\
        --summary data/sft/chat_summary.json [--metrics output/sft/metrics/rank_0.jsonl] [--tolerance 1e-5]

1. Logits: tools/logits.py runs on both directories (each in its own process, as a user would) over the first
   conversations of the preprocessed data; the largest absolute difference must be within --tolerance.
2. Tokenizer: the export's tokenizer.json must have the sha256 that tools/preprocess_sft_data.py recorded in its
   summary (the same tokenizer made the training ids), and tokenizer_config.json must be there (chat template).
3. With --metrics: the mean target loss (lm_loss) of the last tenth of the steps against the first tenth.
Prints one line per check; exit 1 when one fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def sample_tokens(summary_path, rows=2, length=64):
    """[rows, length] token ids: the first conversations of the data, cut or repeated to `length`."""
    from mindpretrain.data.indexed_dataset import IndexedDataset

    prefix = summary_path[:-len("_summary.json")]
    dataset = IndexedDataset(f"{prefix}_input_ids_document")
    ids = [np.resize(np.asarray(dataset[index], dtype=np.int64), length) for index in range(min(rows, len(dataset)))]
    return np.stack(ids)


def logits_of(checkpoint, tokens_path, folder, name):
    out = os.path.join(folder, f"{name}.npy")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "logits.py"), "--checkpoint", checkpoint,
                    "--tokens", tokens_path, "--output", out], check=True, stdout=subprocess.DEVNULL)
    return np.load(out)


def check_logits(args):
    with tempfile.TemporaryDirectory() as folder:
        tokens_path = os.path.join(folder, "tokens.npy")
        np.save(tokens_path, sample_tokens(args.summary))
        native = logits_of(args.native, tokens_path, folder, "native")
        exported = logits_of(args.hf, tokens_path, folder, "hf")
    difference = float(np.abs(native - exported).max())
    return difference <= args.tolerance, (f"logits: max |native - hf| = {difference:.3g} over "
                                          f"{native.shape[0]}x{native.shape[1]} tokens (tolerance {args.tolerance:g})")


def check_tokenizer(args):
    with open(args.summary, encoding="utf-8") as handle:
        expected = json.load(handle)["tokenizer"]["sha256"]
    exported = os.path.join(args.hf, "tokenizer.json")
    if not os.path.isfile(exported):
        return False, f"tokenizer: {exported} is missing (export with --tokenizer-dir)"
    from mindpretrain.data.index_cache import file_digest

    actual = file_digest(exported, algorithm="sha256")
    has_config = os.path.isfile(os.path.join(args.hf, "tokenizer_config.json"))
    return actual == expected and has_config, (f"tokenizer: sha256 {actual[:16]}… "
                                               f"{'equals' if actual == expected else 'DIFFERS from'} the "
                                               f"preprocessing summary's {expected[:16]}…; tokenizer_config.json "
                                               f"{'present' if has_config else 'MISSING'}")


def check_learning(metrics_path):
    with open(metrics_path, encoding="utf-8") as handle:
        losses = [json.loads(line)["lm_loss"] for line in handle if line.strip()]
    tenth = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))
    return last < first, (f"learning: target loss {first:.4f} (first {tenth} steps) -> {last:.4f} (last {tenth} "
                          f"of {len(losses)} steps)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="check_sft_export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--native", required=True, help="native checkpoint (training step directory)")
    parser.add_argument("--hf", required=True, help="its HF export (tools/convert_native_to_hf.py output)")
    parser.add_argument("--summary", required=True, help="<prefix>_summary.json of tools/preprocess_sft_data.py")
    parser.add_argument("--metrics", default=None, help="metrics/rank_0.jsonl of the fine-tuning run")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    results = [check_logits(args), check_tokenizer(args)]
    if args.metrics:
        results.append(check_learning(args.metrics))
    for passed, line in results:
        print(("ok   " if passed else "FAIL ") + line)
    return 0 if all(passed for passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
