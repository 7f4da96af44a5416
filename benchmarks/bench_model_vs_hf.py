"""One DeepSeek-V3 training step (forward + backward + AdamW): our model in MindSpore GRAPH mode vs HF transformers
on PyTorch, same config, same CPU. Reports steady-state step time and peak RSS of each, and the ratios.

    .venv/bin/python benchmarks/bench_model_vs_hf.py [--steps 5] [--batch 4] [--seq 512]

Config (issue 3): hidden 256, 4 layers (first dense), 8 routed experts top-2 + 1 shared, vocab 32000, no MTP
(transformers has none in its forward), balance loss off (HF has none), fp32. Each side runs in its own process
so the peak RSS (VmHWM) is that framework's alone; the first step (graph compilation for us, allocator warm-up
for torch) is reported apart and left out of the median. Writes benchmarks/results/model_vs_hf.json. Numbers
depend on the machine's load: the JSON records the load average before and after.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "model_vs_hf.json")
CONFIG = dict(vocab_size=32000, hidden_size=256, intermediate_size=704, moe_intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
              first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
              qk_nope_head_dim=32, v_head_dim=32, num_nextn_predict_layers=0, rope_scaling=None)


def _peak_rss_mib():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_ours(steps, batch, seq):
    import numpy as np

    import mindspore as ms
    from mindspore import nn, ops

    sys.path.insert(0, ROOT)
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.deepseek3_model import DeepseekV3ForCausalLM

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")

    class Step(nn.Cell):
        def __init__(self, network, optimizer):
            super().__init__()
            self.network, self.optimizer = network, optimizer
            self.weights = optimizer.parameters
            self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

        def construct(self, ids, labels, mask):
            outputs = self.network(ids, labels, mask)
            sens = (ops.ones_like(outputs[0]),) + tuple(ops.zeros_like(item) for item in outputs[1:])
            self.optimizer(self.grad(self.network, self.weights)(ids, labels, mask, sens))
            return outputs[0]

    cfg = DeepseekV3Config(seq_length=seq, compute_dtype="float32", seq_balance_loss_alpha=0.0, **CONFIG)
    model = DeepseekV3ForCausalLM(cfg)
    step = Step(model, nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-4, weight_decay=0.01))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    ids, labels = ms.Tensor(tokens[:, :-1]), ms.Tensor(tokens[:, 1:])
    mask = ms.Tensor(np.ones((batch, seq), np.float32))
    baseline = _peak_rss_mib()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        float(step(ids, labels, mask).asnumpy())
        times.append(time.perf_counter() - started)
    return times, baseline


def run_hf(steps, batch, seq):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    kwargs = {key: value for key, value in CONFIG.items() if key != "rope_scaling"}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(num_key_value_heads=CONFIG["num_attention_heads"],
                                                   max_position_embeddings=max(seq, 4096), **kwargs)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    tokens = torch.randint(0, CONFIG["vocab_size"], (batch, seq))
    baseline = _peak_rss_mib()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times, baseline


def child(side, steps, batch, seq):
    times, baseline = (run_ours if side == "ours" else run_hf)(steps, batch, seq)
    print(json.dumps({"times": times, "peak_rss_mib": _peak_rss_mib(), "rss_before_first_step_mib": baseline}))


def summarise(raw):
    times = raw["times"]
    return {"first_step_s": times[0], "median_step_s": statistics.median(times[1:]), "steps_s": times,
            "peak_rss_mib": raw["peak_rss_mib"], "rss_before_first_step_mib": raw["rss_before_first_step_mib"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch, args.seq)
        return
    load_before = os.getloadavg()
    results = {}
    for side in ("hf", "ours"):
        out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--seq", str(args.seq)],
                             capture_output=True, text=True, check=True)
        results[side] = summarise(json.loads(out.stdout.strip().splitlines()[-1]))
        print(side, json.dumps(results[side]), flush=True)
    report = {
        "config": dict(CONFIG, batch=args.batch, seq_length=args.seq, dtype="float32", optimizer="AdamW"),
        "ours_mindspore_graph": results["ours"], "hf_transformers_torch": results["hf"],
        "time_ratio_ours_over_hf": results["ours"]["median_step_s"] / results["hf"]["median_step_s"],
        "peak_rss_ratio_ours_over_hf": results["ours"]["peak_rss_mib"] / results["hf"]["peak_rss_mib"],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
    }
    sys.path.insert(0, ROOT)
    from mindpretrain.utils.atomic_files import atomic_write_json

    atomic_write_json(RESULT, report, make_parent=True, indent=2)
    print(f"time ratio (ours / HF) {report['time_ratio_ours_over_hf']:.2f}, "
          f"peak RSS ratio {report['peak_rss_ratio_ours_over_hf']:.2f}; wrote {RESULT}")


if __name__ == "__main__":
    main()
