"""Step time and tokens/s of the tiny DeepSeek-V3 config on CPU: 1 process vs 2 msrun workers.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 10] [--seq-length 128] [--batch-size 2]

Both runs train the same config (configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml) on the demo
corpus (tools/make_demo_corpus.py, DeepSeek-V3 tokenizer) with `batch_size` samples per rank, so the
2-worker run processes twice the tokens per step (weak scaling, as data parallelism is used). Step
times come from the trainer's per-step metrics; the first steps (graph compilation) are reported
apart and left out of the steady-state mean. Writes benchmarks/results/bench_train_step.json.
Numbers depend on the machine's load: the JSON records the load average at start and end.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
CONFIG = os.path.join(ROOT, "configs", "deepseek3", "pretrain_deepseek3_tiny_cpu.yaml")
WARMUP_STEPS = 2


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_data(folder):
    corpus = os.path.join(folder, "corpus.txt")
    subprocess.run([PYTHON, os.path.join(ROOT, "tools", "make_demo_corpus.py"), "--output", corpus], check=True)
    prefix = os.path.join(folder, "demo")
    subprocess.run([PYTHON, os.path.join(ROOT, "research", "deepseek3", "wikitext_to_bin.py"), "--input", corpus,
                    "--output-prefix", prefix], check=True, cwd=ROOT)
    return prefix + "_text_document"


def train_arguments(data_prefix, output_dir, args):
    return ["run_mindformer.py", "--register_path", "research/deepseek3", "--config", CONFIG,
            "--output_dir", output_dir, f"--runner_config.train_steps={args.steps}",
            f"--runner_config.batch_size={args.batch_size}",
            f"--train_dataset.data_loader.config.seq_length={args.seq_length}",
            f"--train_dataset.data_loader.config.data_path=[{data_prefix}]"]


def run(workers, data_prefix, output_dir, args):
    command = train_arguments(data_prefix, output_dir, args)
    started = time.time()
    if workers == 1:
        subprocess.run([PYTHON, *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), " ".join(command), str(workers),
                        str(workers), "127.0.0.1", str(free_port()), "0", os.path.join(output_dir, "msrun_log"),
                        "True", "600"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - started
    with open(os.path.join(output_dir, "metrics", "rank_0.jsonl"), encoding="utf-8") as handle:
        metrics = [json.loads(line) for line in handle]
    steady = [m["step_time"] for m in metrics[WARMUP_STEPS:]]
    tokens_per_step = workers * args.batch_size * args.seq_length
    mean = sum(steady) / len(steady)
    return {"workers": workers, "tokens_per_step": tokens_per_step, "first_step_seconds": metrics[0]["step_time"],
            "steady_step_seconds": mean, "steady_tokens_per_second": tokens_per_step / mean,
            "steady_steps_measured": len(steady), "wall_seconds": wall,
            "lm_loss_first_last": [metrics[0]["lm_loss"], metrics[-1]["lm_loss"]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "bench_train_step.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        data_prefix = prepare_data(folder)
        results = [run(workers, data_prefix, os.path.join(folder, f"run{workers}"), args) for workers in (1, 2)]
    report = {"benchmark": "tiny DeepSeek-V3 train step (CPU, GRAPH mode)", "config": os.path.relpath(CONFIG, ROOT),
              "steps": args.steps, "seq_length": args.seq_length, "batch_size_per_rank": args.batch_size,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
              "results": results,
              "scaling_tokens_per_second_2_vs_1": results[1]["steady_tokens_per_second"]
              / results[0]["steady_tokens_per_second"]}
    sys.path.insert(0, ROOT)  # the checkout's package, for its atomic writer
    from mindpretrain.utils.atomic_files import atomic_write_json

    atomic_write_json(args.output, report, make_parent=True, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
