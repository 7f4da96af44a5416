"""Peak RSS of our shipped 1B YAML trained on CPU, next to tools/plan.py's per-device figure for the same run.

    .venv/bin/python benchmarks/bench_1b_memory.py [--steps 2] [--seq 256] [--batch 1] [--config YAML] [--output JSON]

Trains research/deepseek3/deepseek3_671b/pretrain_deepseek3_1b.yaml through run_mindformer.py with the overrides
of a one-machine CPU run: `--use_parallel False --device_target CPU`, seq_length `--seq`, batch_size `--batch`,
compute in float32, data/model/pipeline/expert parallel 1, num_parallel_workers 1, `--steps` steps, on a
synthetic Megatron BIN dataset of random tokens written to a temporary folder. `tools/plan.py --json` plans the
same YAML with the same overrides. Writes benchmarks/results/1b_memory.json (`--output`).

The run is a child process that calls run_mindformer.main in-process, so its VmHWM is the training process's
own; the peak is also recorded after every step (the first includes graph compilation). The child skips the
checkpoint the trainer writes at the end (it would copy every tensor, 15 GB of weights and optimizer state
for the 1B model, to disk and into memory): the figure is the training step's. The parent also records
getrusage's max RSS of its children, which survives the child being killed for lack of memory.
Run at least 2 steps: the zero-initialised AdamW moments only become resident in the first update, so only
from the second step on does the forward/backward run with all optimizer state in memory.
The 1B run's tensors are 19.5 GiB; the planner, counting the CPU process too, says 20.05 GiB, and on a 24 GiB
machine the run trains its 10 steps at a peak of 21263 MiB, ~11.7 s per step (docs/planner.md; before the
optimizer step moved to the host it was killed in its second step); with the CPU kernels of mindpretrain/kernels/
20825 MiB on a slower machine (53-55 s per step there). Check the script with the tiny config first:
    --config configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml --steps 2 --output /tmp/tiny_memory.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from proc_memory import status_mib  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "research", "deepseek3", "deepseek3_671b", "pretrain_deepseek3_1b.yaml")
RESULT = os.path.join(ROOT, "benchmarks", "results", "1b_memory.json")
MIB = 2 ** 20




def run_overrides(config_path, args, data_prefix, output_dir):
    """`--key=value` for the keys the YAML has, `--+key=value` for those it adds (both frameworks' vocabulary)."""
    sys.path.insert(0, ROOT)
    from mindpretrain.config import load_config

    config = load_config(config_path).to_dict()
    wanted = {"model.model_config.seq_length": args.seq, "train_dataset.data_loader.config.seq_length": args.seq,
              "runner_config.batch_size": args.batch, "runner_config.train_steps": args.steps,
              "runner_config.gradient_accumulation_steps": 1, "model.model_config.compute_dtype": "float32",
              "model.model_config.param_init_type": "float32", "parallel_config.data_parallel": 1,
              "parallel_config.model_parallel": 1, "parallel_config.pipeline_stage": 1,
              "parallel_config.expert_parallel": 1, "train_dataset.num_parallel_workers": 1,
              "train_dataset.data_loader.config.data_path": f"[1, \"{data_prefix}\"]",
              "train_dataset.data_loader.sizes": "[null, 0, 0]", "output_dir": output_dir}
    overrides = []
    for key, value in wanted.items():
        node, present = config, True
        for part in key.split("."):
            present = isinstance(node, dict) and part in node
            node = node.get(part) if present else None
            if not present:
                break
        overrides.append(f"--{'' if present else '+'}{key}={value}")
    return overrides, config["model"]["model_config"]["vocab_size"]


def write_synthetic_data(prefix, vocab_size, samples, seq):
    """Random-token documents enough for `samples` samples of seq + 1 tokens, twice over."""
    import numpy as np

    sys.path.insert(0, ROOT)
    from mindpretrain.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for _ in range(2 * max(samples, 4)):
            builder.add_document(rng.integers(0, vocab_size, seq + 1, dtype=np.int32))
    return prefix


def child_train(argv):
    """run_mindformer.main(argv) in this process, VmHWM after every step, no final checkpoint."""
    sys.path.insert(0, ROOT)
    import run_mindformer
    from mindpretrain.training.trainer import Trainer

    per_step, train_step = [], Trainer._train_step

    def measured_step(self, *step_args, **step_kwargs):
        outcome = train_step(self, *step_args, **step_kwargs)
        per_step.append(status_mib("VmHWM"))
        return outcome

    Trainer._train_step = measured_step
    Trainer._save = lambda self: None
    code = None
    try:
        code = run_mindformer.main(argv)
    finally:
        print(json.dumps({"exit_code": code, "vm_hwm_mib": status_mib("VmHWM"), "vm_hwm_after_step_mib": per_step}),
              flush=True)


def plan_figure(config_path, overrides, budget_bytes):
    """tools/plan.py's per-device memory for the same YAML and overrides (the run's flags as YAML keys)."""
    command = [sys.executable, os.path.join(ROOT, "tools", "plan.py"), "--config", config_path, "--json",
               "--device-memory", str(int(budget_bytes)), "--use_parallel=False", "--context.device_target=CPU",
               *overrides]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-2000:]}
    plan = json.loads(out.stdout)
    worst = plan["memory_bytes_per_device"][plan["worst_stage"]]
    return {"per_device_total_mib": plan["worst_stage_bytes"] / MIB, "fits": plan["fits"],
            "terms_mib": {key: value / MIB for key, value in worst.items() if isinstance(value, float)},
            "optimizer_factor": plan["optimizer_factor"], "setup": plan["setup"]}


def _mem_total_bytes():
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def train(config_path, args, overrides):
    """The child run; its report, stderr tail and the step metrics the trainer wrote."""
    command = [sys.executable, os.path.abspath(__file__), "--child-train", "--register_path",
               os.path.join(ROOT, "research", "deepseek3"), "--config", config_path, "--use_parallel", "False",
               "--device_target", "CPU", *overrides]
    started = time.time()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    result = {"wall_seconds": time.time() - started, "returncode": out.returncode,
              "children_max_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
              "stderr_tail": out.stderr.strip().splitlines()[-8:]}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{\"exit_code\"")]
    if lines:
        result.update(json.loads(lines[-1]))
    return result


def _metrics(output_dir):
    path = os.path.join(output_dir, "metrics", "rank_0.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [{key: row.get(key) for key in ("step", "loss", "lm_loss", "step_time")} for row in rows]


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--output", default=RESULT)
    args = parser.parse_args()
    for name in ("steps", "seq", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file")
    return args


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child-train":
        child_train(sys.argv[2:])
        return
    args = _arguments()
    config_path = os.path.abspath(args.config)
    with tempfile.TemporaryDirectory(prefix="bench_1b_memory_") as folder:
        output_dir, data_prefix = os.path.join(folder, "output"), os.path.join(folder, "synthetic_text_document")
        overrides, vocab_size = run_overrides(config_path, args, data_prefix, output_dir)
        write_synthetic_data(data_prefix, vocab_size, args.steps * args.batch, args.seq)
        plan = plan_figure(config_path, overrides, _mem_total_bytes())
        print("plan", json.dumps(plan), flush=True)
        load_before = os.getloadavg()
        run = train(config_path, args, overrides)
        run["loadavg_before"], run["loadavg_after"] = load_before, os.getloadavg()
        run["metrics"] = _metrics(output_dir)
    measured = run.get("vm_hwm_mib", run["children_max_rss_mib"])
    report = {"config": os.path.relpath(config_path, ROOT), "overrides": overrides, "steps": args.steps,
              "run": run, "plan": plan, "machine_memory_mib": _mem_total_bytes() / MIB,
              "measured_over_planned": (measured / plan["per_device_total_mib"]
                                        if "per_device_total_mib" in plan else None)}
    sys.path.insert(0, ROOT)
    from mindpretrain.utils.atomic_files import atomic_write_json

    atomic_write_json(args.output, report, make_parent=True, indent=2)
    print(f"exit {run['returncode']}, peak RSS {measured:.0f} MiB, planned "
          f"{plan.get('per_device_total_mib', float('nan')):.0f} MiB per device; wrote {args.output}")


if __name__ == "__main__":
    main()
