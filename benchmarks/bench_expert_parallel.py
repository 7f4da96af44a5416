"""Expert parallelism on CPU: step time and peak RSS per rank at expert_parallel 1 vs 2, 2 msrun workers.

    .venv/bin/python benchmarks/bench_expert_parallel.py [--rounds 3] [--steps 12] [--experts 16]

Both layouts train the tiny DeepSeek-V3 (configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml with vocab 256,
`n_routed_experts` 16 and a wider expert FFN so the experts weigh something) with dp 2 on the same synthetic
data. The launches alternate (ep1, ep2, ep1, ...); each worker reports its median steady step time (the first
2 steps, compilation, left out), its peak RSS (VmHWM) and the bytes of the routed-expert parameters it holds.
Prints medians per layout, the ep2/ep1 ratios and their spread over the rounds, the load average; writes
benchmarks/results/bench_expert_parallel.json.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "deepseek3", "pretrain_deepseek3_tiny_cpu.yaml")
WARMUP_STEPS = 2


WORKER_ENV = "BENCH_EXPERT_PARALLEL_OUT"     # set for the msrun workers: where they write their figures


def worker(run_args, out):
    """One msrun worker: run_mindformer's set-up and trainer, then this rank's figures as JSON."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import numpy as np

    import run_mindformer
    from mindpretrain.training import launch
    from mindpretrain.training.trainer import Trainer
    from proc_memory import status_mib
    from research.deepseek3.expert_parallel import local_expert_bytes

    _, run_config = run_mindformer.resolve_config(run_args)
    launch.load_plugins(run_config["register_path"])
    context = launch.setup_run(run_config)
    trainer = Trainer(context.settings, context.model, context.model_config, context.dp)
    trainer.train()
    times = [row["step_time"] for row in trainer.history][WARMUP_STEPS:]
    result = {"rank": context.rank, "median_step_s": float(np.median(times)), "peak_rss_mib": status_mib("VmHWM"),
              "expert_bytes": local_expert_bytes(context.model)}
    with open(os.path.join(out, f"rank_{context.rank}.json"), "w") as handle:
        json.dump(result, handle)


def write_data(folder, vocab=256):
    sys.path.insert(0, ROOT)
    import numpy as np

    from mindpretrain.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.RandomState(0)
    prefix = os.path.join(folder, "synthetic")
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for _ in range(400):
            builder.add_document(rng.randint(0, vocab, rng.randint(50, 300)).astype(np.int32))
    return prefix


def launch(ep, args, data_prefix, folder):
    out = os.path.join(folder, f"ep{ep}")
    os.makedirs(out, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_args = ["--config", CONFIG, "--register_path", os.path.join(ROOT, "research", "deepseek3"),
                "--output_dir", out, f"--train_dataset.data_loader.config.data_path=[{data_prefix}]",
                "--model.model_config.vocab_size=256", f"--model.model_config.n_routed_experts={args.experts}",
                "--model.model_config.moe_intermediate_size=256", f"--runner_config.train_steps={args.steps}",
                f"--parallel_config.expert_parallel={ep}", "--parallel_config.data_parallel=2",
                "--runner_config.batch_size=4", "--callbacks.1.save_checkpoint_steps=100000"]
    command = " ".join([os.path.abspath(__file__), *run_args])
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), command, "2", "2", "127.0.0.1",
                    str(port), "0", os.path.join(out, "msrun_log"), "True", "600"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, **{WORKER_ENV: out}))
    return [json.load(open(os.path.join(out, f"rank_{rank}.json"))) for rank in (0, 1)]


def summarise(rounds):
    def per_layout(ep, key):
        return [statistics.mean(rank[key] for rank in one[ep]) for one in rounds]

    summary = {}
    for key in ("median_step_s", "peak_rss_mib", "expert_bytes"):
        ones, twos = per_layout(1, key), per_layout(2, key)
        ratios = [two / one for one, two in zip(ones, twos)]
        summary[key] = {"ep1_median": statistics.median(ones), "ep2_median": statistics.median(twos),
                        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                        "ep1": ones, "ep2": twos}
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from mindpretrain.utils.atomic_files import atomic_write_json
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        prefix = write_data(folder)
        rounds = []
        for index in range(args.rounds):
            rounds.append({ep: launch(ep, args, prefix, os.path.join(folder, f"round{index}")) for ep in (1, 2)})
    summary = summarise(rounds)
    result = {"rounds": args.rounds, "steps": args.steps, "experts": args.experts, "load_start": load_start,
              "load_end": os.getloadavg(), "summary": summary}
    for key, values in summary.items():
        print(f"{key}: ep1 {values['ep1_median']:.4g}, ep2 {values['ep2_median']:.4g}, ep2/ep1 "
              f"{values['ratio_median']:.3f} (rounds {values['ratio_min']:.3f}-{values['ratio_max']:.3f})")
    print(f"load average {load_start[0]:.2f} -> {result['load_end'][0]:.2f}")
    atomic_write_json(os.path.join(ROOT, "benchmarks", "results", "bench_expert_parallel.json"), result, make_parent=True,
                      indent=1)


if __name__ == "__main__":
    if os.environ.get(WORKER_ENV):
        worker(sys.argv[1:], os.environ[WORKER_ENV])
    else:
        main()
