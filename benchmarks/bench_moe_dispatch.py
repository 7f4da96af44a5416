"""Times the MoE block's block-sparse dropless dispatch against a dense all-experts baseline, GRAPH mode on CPU.

Both variants share one router and the same weights (shared experts off by default: they cost both the same);
only the routed-expert compute differs. The dense baseline runs every expert on every token and zeroes the
unselected ones through the combine weights (what a static-shape MoE does without a dispatch). Each variant is
timed forward-only and forward+backward (gradients of all trained parameters, the train-step shape) after one
compile call; the median over several steps is reported, the variants taking turns step by step so that load
from other processes hits all alike (the 1-minute load average is recorded). Outputs are checked to agree.

    python benchmarks/bench_moe_dispatch.py                      # 8 experts top-2, hidden 256, 2048 tokens
    python benchmarks/bench_moe_dispatch.py --block-sizes 32 64 128 256 --steps 5
    python benchmarks/bench_moe_dispatch.py --footprint-only     # static sizes only, no timing

The grouped-matmul dispatch (``moe_dispatch: grouped_matmul``) needs Ascend's GroupedMatmul kernel and is not
timed here (no CPU kernel); its static sizes are recorded next to the block-sparse ones (``footprints``), for the
benchmark's shape and for 671B's (256 experts, top-8, 4096 tokens, no expert parallelism).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's packages, without installing
import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402

from mindpretrain.utils.atomic_files import atomic_write_json  # noqa: E402
from research.deepseek3.moe import (DeepseekV3MoE, default_block_size, dispatch_footprint,  # noqa: E402
                                    grouped_matmul_footprint, num_dispatch_blocks)

RESULTS = os.path.join(HERE, "results", "moe_dispatch.json")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512, help="moe_intermediate_size")
    parser.add_argument("--shared-experts", type=int, default=0,
                        help="n_shared_experts (0 isolates the routed part; the shared expert costs both the same)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[],
                        help="extra block sizes to time besides the default rule")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant; the median is reported")
    parser.add_argument("--torch-reference", action="store_true",
                        help="also time HF transformers' DeepseekV3MoE on PyTorch CPU (test-only dependency)")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--footprint-only", action="store_true",
                        help="print the static dispatch sizes (block-sparse vs grouped matmul) and exit")
    return parser.parse_args()


class DenseMoE(DeepseekV3MoE):
    """Baseline: every expert computes every token; unselected experts get combine weight 0."""

    def __init__(self, model_config):
        super().__init__(model_config)
        self.batch_matmul_nt = ops.BatchMatMul(transpose_b=True)   # x @ W^T without materialising W^T

    def _dispatch_compute_combine(self, x, selected, counts, topk_weight):
        tokens = x.shape[0]
        one_hot = ops.cast(selected, ms.float32).reshape(tokens, self.top_k, self.num_experts)
        combine = (one_hot * topk_weight.reshape(tokens, self.top_k, 1)).sum(1)           # [N, E]
        xs = ops.broadcast_to(ops.cast(x, self.compute_dtype).reshape(1, tokens, -1),
                              (self.num_experts, tokens, x.shape[1]))
        gate_w, up_w, down_w = (self._stacked(name) for name in ("gate_proj", "up_proj", "down_proj"))
        h = ops.silu(self.batch_matmul_nt(xs, gate_w)) * self.batch_matmul_nt(xs, up_w)
        y = self.batch_matmul_nt(h, down_w)                                                 # [E, N, H]
        return (y * combine.T.reshape(self.num_experts, tokens, 1)).sum(0)


class Forward(nn.Cell):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def construct(self, hidden):
        return self.moe(hidden)[0]


class ForwardBackward(nn.Cell):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe
        self.weights = ms.ParameterTuple(moe.trainable_params())
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, hidden):
        return self.grad(self._loss, self.weights)(hidden)

    def _loss(self, hidden):
        out, _, balance = self.moe(hidden)
        return (out * out).mean() + balance


def compile_seconds(cell, hidden):
    """The first call compiles the graph; its wall time is reported separately from the steps."""
    start = time.perf_counter()
    result = cell(hidden)
    _block(result)
    return time.perf_counter() - start, result


def interleaved_medians(cells, hidden, steps):
    """Median step time per cell, the cells taking turns each round so that load from other processes on a
    shared machine hits every variant alike."""
    times = [[] for _ in cells]
    for _ in range(steps):
        for index, cell in enumerate(cells):
            start = time.perf_counter()
            _block(cell(hidden))
            times[index].append(time.perf_counter() - start)
    return [statistics.median(column) for column in times]


def _block(result):
    if result is None:
        return
    for item in result if isinstance(result, (tuple, list)) else [result]:
        item.asnumpy()


def torch_reference(cfg, state, hidden_np):
    """HF DeepseekV3MoE with the same weights: (forward, forward+backward) callables and its output."""
    import torch
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as HFMoE

    hf = HFMoE(transformers.DeepseekV3Config(
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok, n_group=1,
        topk_group=1, norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
        n_shared_experts=cfg.n_shared_experts)).float()
    with torch.no_grad():
        hf.gate.weight.copy_(torch.tensor(state["gate.weight"]))
        for e in range(cfg.n_routed_experts):
            gate_up = np.concatenate([state[f"experts.{e}.gate_proj.weight"], state[f"experts.{e}.up_proj.weight"]])
            hf.experts.gate_up_proj[e].copy_(torch.tensor(gate_up))
            hf.experts.down_proj[e].copy_(torch.tensor(state[f"experts.{e}.down_proj.weight"]))
        for name, param in hf.shared_experts.named_parameters():   # zero-sized when n_shared_experts is 0
            if cfg.n_shared_experts:
                param.copy_(torch.tensor(state[f"shared_experts.{name}"]))
    hidden = torch.tensor(hidden_np)

    def forward(_):
        with torch.no_grad():
            hf(hidden)

    def forward_backward(_):
        hf.zero_grad()
        (hf(hidden) ** 2).mean().backward()

    with torch.no_grad():
        out = hf(hidden).numpy()
    return forward, forward_backward, out, torch.get_num_threads()


def footprints(args):
    """Rows computed and expert-weight elements materialised per MoE layer, block-sparse vs grouped matmul."""
    shapes = {"benchmark": (args.batch * args.seq, args.top_k, args.experts, args.hidden, args.intermediate),
              "deepseek_v3_671b_4096_tokens_no_expert_parallel": (4096, 8, 256, 7168, 2048)}
    table = {}
    for name, shape in shapes.items():
        block, grouped = dispatch_footprint(*shape), grouped_matmul_footprint(*shape)
        table[name] = dict(block_sparse=block, grouped_matmul=grouped,
                           weight_copy_ratio_block_vs_grouped=block["weight_copy_elements"]
                           / grouped["stacked_weight_elements"])
    return table


def main():
    args = parse_args()
    if args.footprint_only:
        print(json.dumps(footprints(args), indent=2))
        return
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(0)
    cfg = types.SimpleNamespace(hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                                n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=1,
                                topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                                n_shared_experts=args.shared_experts,
                                initializer_range=0.02, compute_dtype="float32", param_init_type="float32",
                                seq_balance_loss_alpha=0.0001)
    tokens = args.batch * args.seq
    hidden = Tensor(np.random.RandomState(0).randn(args.batch, args.seq, args.hidden).astype(np.float32))
    default_block = default_block_size(tokens * args.top_k, args.experts)
    block_sizes = [default_block] + sorted(set(args.block_sizes) - {default_block})
    variants = [("dense_all_experts", None)] + [(f"dispatch_block{b}", b) for b in block_sizes]
    reference = DeepseekV3MoE(cfg)
    state = {name: param.asnumpy() for name, param in reference.parameters_and_names()}
    rows, forwards, backwards = [], [], []
    dense_out = None
    for name, block in variants:
        moe = DenseMoE(cfg) if block is None else DeepseekV3MoE(cfg, block_size=block)
        for param_name, param in moe.parameters_and_names():
            param.set_data(Tensor(state[param_name]))
        forwards.append(Forward(moe))
        backwards.append(ForwardBackward(moe))
        fwd_compile, out = compile_seconds(forwards[-1], hidden)
        bwd_compile, _ = compile_seconds(backwards[-1], hidden)
        if dense_out is None:
            dense_out = out.asnumpy()
        expert_rows = (tokens * args.experts if block is None
                       else num_dispatch_blocks(tokens, args.top_k, args.experts, block) * block)
        rows.append(dict(variant=name, block_size=block, expert_rows=expert_rows, forward_compile_s=fwd_compile,
                         forward_backward_compile_s=bwd_compile,
                         max_abs_diff_vs_dense=float(np.abs(out.asnumpy() - dense_out).max())))
    torch_threads = None
    if args.torch_reference:
        forward, forward_backward, out, torch_threads = torch_reference(cfg, state, hidden.asnumpy())
        forward_backward(None)                                                   # warm-up
        forwards.append(forward)
        backwards.append(forward_backward)
        rows.append(dict(variant=f"hf_transformers_torch{torch_threads}threads", block_size=None,
                         expert_rows=tokens * args.top_k, forward_compile_s=0.0, forward_backward_compile_s=0.0,
                         max_abs_diff_vs_dense=float(np.abs(out - dense_out).max())))
    load_before = os.getloadavg()[0]
    for row, seconds in zip(rows, interleaved_medians(forwards, hidden, args.steps)):
        row["forward_ms"] = seconds * 1e3
    for row, seconds in zip(rows, interleaved_medians(backwards, hidden, args.steps)):
        row["forward_backward_ms"] = seconds * 1e3
    load_after = os.getloadavg()[0]
    for row in rows:
        print(f"{row['variant']:22s} rows {row['expert_rows']:6d}  fwd {row['forward_ms']:8.1f} ms  fwd+bwd "
              f"{row['forward_backward_ms']:8.1f} ms  compile {row['forward_compile_s']:5.1f}+"
              f"{row['forward_backward_compile_s']:5.1f} s  max|diff| {row['max_abs_diff_vs_dense']:.2e}", flush=True)
    dense = rows[0]
    for row in rows[1:]:
        row["speedup_forward_vs_dense"] = dense["forward_ms"] / row["forward_ms"]
        row["speedup_forward_backward_vs_dense"] = dense["forward_backward_ms"] / row["forward_backward_ms"]
        print(f"{row['variant']}: {row['speedup_forward_vs_dense']:.2f}x forward, "
              f"{row['speedup_forward_backward_vs_dense']:.2f}x forward+backward vs dense")
    report = dict(benchmark="moe_dispatch", mode="GRAPH", device="CPU", mindspore=ms.__version__,
                  machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                  load_average_1min=dict(before_timing=load_before, after_timing=load_after),
                  config=dict(experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                              moe_intermediate_size=args.intermediate, tokens=tokens, batch=args.batch,
                              seq=args.seq, steps=args.steps, n_shared_experts=args.shared_experts),
                  results=rows, footprints=footprints(args))
    atomic_write_json(args.output, report, make_parent=True, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
