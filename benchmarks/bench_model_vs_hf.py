"""One DeepSeek-V3 training step (forward + backward + AdamW): our model in MindSpore GRAPH mode vs HF transformers
on PyTorch, same config, same CPU, same thread count. Reports per framework the median step time and peak RSS,
and the ratios ours / HF with their spread over rounds.

    .venv/bin/python benchmarks/bench_model_vs_hf.py [--rounds 3] [--steps 5] [--batch 4] [--seq 512] [--threads N]

Config (issue 3): hidden 256, 4 layers (first dense), 8 routed experts top-2 + 1 shared, vocab 32000, no MTP
(transformers has none in its forward), balance loss off (HF has none), fp32. Both sides run AdamW with bias
correction (ours: mindpretrain's AdamW as the trainer drives it, train_step.UpdateStep: on CPU the host update in
place on the parameters after the compiled forward/backward; HF: torch.optim.AdamW), weight decay 0.01 on
matrices only.

Fairness on a shared machine: every run is its own process (so VmHWM is that framework's alone), and the two
frameworks alternate, HF ours HF ours ... (`--rounds` of each), so a change of load hits both alike. Each run's
first step (graph compilation for us, allocator warm-up for torch) is reported apart and left out of its
median. Per framework: the median over rounds of the per-run median step time, and of the peak RSS; the ratio
of those medians (ours / HF) with the min-max of the per-round ratios. The 1-minute load average is recorded
before and after every run. Both sides get `--threads` kernel threads (torch.set_num_threads; MindSpore's
device_context.cpu.op_tuning.threads_num) and OMP_NUM_THREADS. Writes benchmarks/results/model_vs_hf.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from proc_memory import status_mib  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "model_vs_hf.json")
SIDES = ("hf", "ours")
LR, WEIGHT_DECAY = 1e-4, 0.01
CONFIG = dict(vocab_size=32000, hidden_size=256, intermediate_size=704, moe_intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
              first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
              qk_nope_head_dim=32, v_head_dim=32, num_nextn_predict_layers=0, rope_scaling=None)




def run_ours(steps, batch, seq, threads):
    import numpy as np

    import mindspore as ms
    from mindspore import nn, ops

    ms.device_context.cpu.op_tuning.threads_num(threads)
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    sys.path.insert(0, ROOT)
    from mindpretrain.training.optimizer import AdamW
    from mindpretrain.training.train_step import UpdateStep
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    class Step(nn.Cell):
        def __init__(self, network, optimizer):
            super().__init__()
            self.network, self.optimizer = network, optimizer
            self.weights = optimizer.parameters
            self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

        def construct(self, ids, labels, mask):
            outputs = self.network(ids, labels, mask)
            sens = (ops.ones_like(outputs[0]),) + tuple(ops.zeros_like(item) for item in outputs[1:])
            return outputs[0], self.grad(self.network, self.weights)(ids, labels, mask, sens)

    cfg = DeepseekV3Config(seq_length=seq, compute_dtype="float32", seq_balance_loss_alpha=0.0, **CONFIG)
    model = DeepseekV3ForCausalLM(cfg)
    optimizer = AdamW(model.trainable_params(), betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    forward_backward, update, no_clipping = Step(model, optimizer), UpdateStep(optimizer), ms.Tensor(1.0, ms.float32)

    def step(ids, labels, mask, lr):
        loss, grads = forward_backward(ids, labels, mask)
        update(grads, lr, no_clipping)
        return loss

    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    ids, labels = ms.Tensor(tokens[:, :-1]), ms.Tensor(tokens[:, 1:])
    mask, lr = ms.Tensor(np.ones((batch, seq), np.float32)), ms.Tensor(LR, ms.float32)
    baseline = status_mib("VmHWM")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        float(step(ids, labels, mask, lr).asnumpy())
        times.append(time.perf_counter() - started)
    return times, baseline


def run_hf(steps, batch, seq, threads):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = {key: value for key, value in CONFIG.items() if key != "rope_scaling"}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(num_key_value_heads=CONFIG["num_attention_heads"],
                                                   max_position_embeddings=max(seq, 4096), **kwargs)).train()
    matrices = [param for param in model.parameters() if param.ndim >= 2]
    vectors = [param for param in model.parameters() if param.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                   {"params": vectors, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.999), eps=1e-8)
    tokens = torch.randint(0, CONFIG["vocab_size"], (batch, seq))
    baseline = status_mib("VmHWM")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times, baseline


def child(side, steps, batch, seq, threads):
    times, baseline = (run_ours if side == "ours" else run_hf)(steps, batch, seq, threads)
    print(json.dumps({"times": times, "peak_rss_mib": status_mib("VmHWM"), "rss_before_first_step_mib": baseline}))


def run_once(side, round_index, args):
    """One framework's process; its step times, peak RSS and the load average around it."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()
    out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps),
                          "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{side} run {round_index} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    times = raw["times"]
    return {"side": side, "round": round_index, "first_step_s": times[0], "median_step_s": statistics.median(times[1:]),
            "steps_s": times, "peak_rss_mib": raw["peak_rss_mib"],
            "rss_before_first_step_mib": raw["rss_before_first_step_mib"],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def summarise(runs, rounds):
    """Per framework medians over rounds, and ours / HF: ratio of the medians, min-max of per-round ratios."""
    by_side = {side: [next(run for run in runs if run["side"] == side and run["round"] == index)
                      for index in range(rounds)] for side in SIDES}
    summary = {}
    for side, side_runs in by_side.items():
        summary[side] = {"median_step_s": _spread([run["median_step_s"] for run in side_runs]),
                         "peak_rss_mib": _spread([run["peak_rss_mib"] for run in side_runs]),
                         "first_step_s": _spread([run["first_step_s"] for run in side_runs])}
    for key, name in (("median_step_s", "time"), ("peak_rss_mib", "peak_rss")):
        per_round = [ours[key] / hf[key] for ours, hf in zip(by_side["ours"], by_side["hf"])]
        summary[f"{name}_ratio_ours_over_hf"] = {
            "ratio_of_medians": summary["ours"][key]["median"] / summary["hf"][key]["median"],
            "min": min(per_round), "max": max(per_round), "per_round": per_round}
    return summary


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each framework, alternating")
    parser.add_argument("--steps", type=int, default=5, help="steps per run; the first is left out")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="kernel threads of both frameworks")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, least in (("rounds", 1), ("steps", 2), ("batch", 1), ("seq", 1), ("threads", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name} {getattr(args, name)}: must be at least {least}")
    return args


def main():
    args = _arguments()
    if args.child:
        child(args.child, args.steps, args.batch, args.seq, args.threads)
        return
    runs = []
    for round_index in range(args.rounds):
        for side in SIDES:
            runs.append(run_once(side, round_index, args))
            run = runs[-1]
            print(f"round {round_index} {side}: median step {run['median_step_s']:.3f} s, peak RSS "
                  f"{run['peak_rss_mib']:.0f} MiB, load {run['loadavg_before'][0]:.2f} -> "
                  f"{run['loadavg_after'][0]:.2f}", flush=True)
    summary = summarise(runs, args.rounds)
    report = {"config": dict(CONFIG, batch=args.batch, seq_length=args.seq, dtype="float32", optimizer="AdamW",
                             steps_per_run=args.steps, rounds=args.rounds, threads=args.threads),
              "summary": summary, "runs": runs, "cpu_count": os.cpu_count()}
    sys.path.insert(0, ROOT)
    from mindpretrain.utils.atomic_files import atomic_write_json

    atomic_write_json(RESULT, report, make_parent=True, indent=2)
    time_ratio, rss_ratio = summary["time_ratio_ours_over_hf"], summary["peak_rss_ratio_ours_over_hf"]
    print(f"step time ours / HF {time_ratio['ratio_of_medians']:.2f} (rounds {time_ratio['min']:.2f}-"
          f"{time_ratio['max']:.2f}), peak RSS ours / HF {rss_ratio['ratio_of_medians']:.2f} (rounds "
          f"{rss_ratio['min']:.2f}-{rss_ratio['max']:.2f}); wrote {RESULT}")


if __name__ == "__main__":
    main()
