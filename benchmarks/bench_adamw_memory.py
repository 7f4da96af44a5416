"""Peak memory and time of one AdamW update: the fused in-place kernel vs the tensor-arithmetic formula.

    .venv/bin/python benchmarks/bench_adamw_memory.py [--rows 129280 --cols 2048] [--tiny-steps 20]

Part 1 updates one fp32 parameter of rows x cols (default: the 1B model's 129280 x 2048 embedding,
1 GiB) once, GRAPH mode, each implementation in its own process. Each child allocates the parameter,
its two moments and a gradient (4 x 1 GiB), resets the process's peak RSS (VmHWM, via
/proc/self/clear_refs) and reports the peak over the update, compilation included, above that
baseline. The zero-initialised moments only become resident at the first update, so
`temporaries_mib` is that peak less the two moments: what the update itself allocates.

Part 2 times the update of the tiny config's parameters (configs/deepseek3/pretrain_deepseek3_tiny_cpu.yaml,
~17M) with each implementation: median of `--tiny-steps` updates after a compiled warm-up one.

Part 3 (fused kernel, 8 parameters of 4096 x 8192, moments made resident first) compares where the
clipping factor is applied: "scale_first" multiplies every gradient first, as
mindpretrain.training.train_step.ApplyUpdateCell does, "scale_inside" passes it to the optimizer
(`optimizer(grads, lr, clip)`), which scales each gradient just before its own update.

"composite" is the previous implementation's formula, which `AdamW` keeps for parameters that are not
float32; the child selects it by clearing the optimizer's `in_place_flags`. Writes
benchmarks/results/adamw_memory.json. The composite update of the default shape peaks near 22 GiB
(measured: 18 full-size temporaries), so it is skipped, and says so, when less memory than
COMPOSITE_NEEDS x the parameter size is available.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from proc_memory import available_mib, status_mib  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "adamw_memory.json")
TINY_CONFIG = os.path.join(ROOT, "configs", "deepseek3", "pretrain_deepseek3_tiny_cpu.yaml")
IMPLEMENTATIONS = ("fused", "composite")
CLIP_PLACEMENTS = ("scale_first", "scale_inside")
CLIP_SHAPE, CLIP_PARAMS = (4096, 8192), 8
COMPOSITE_NEEDS = 24  # parameter sizes of memory the composite update of one parameter needs (measured 22)




def _reset_peak_rss():
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs; False when refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _optimizer(params, implementation):
    sys.path.insert(0, ROOT)
    from mindpretrain.training.optimizer import AdamW

    optimizer = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if implementation == "composite":
        optimizer.in_place_flags = tuple(False for _ in optimizer.in_place_flags)
    return optimizer


def child_one_parameter(implementation, rows, cols):
    import numpy as np

    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    param = ms.Parameter(ms.Tensor(rng.standard_normal((rows, cols), dtype=np.float32)), name="embedding")
    grad = ms.Tensor(rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(1e-2))
    optimizer = _optimizer([param], implementation)
    baseline = status_mib("VmRSS")
    reset = _reset_peak_rss()
    started = time.perf_counter()
    optimizer(ms.mutable((grad,)), ms.Tensor(1e-3, ms.float32))
    float(param[0, 0].asnumpy())
    seconds = time.perf_counter() - started
    peak = status_mib("VmHWM")
    return {"implementation": implementation, "shape": [rows, cols], "rss_before_update_mib": baseline,
            "peak_rss_mib": peak, "peak_above_baseline_mib": peak - baseline if reset else None,
            "peak_reset": reset, "first_update_seconds_with_compile": seconds,
            "parameter_mib": rows * cols * 4 / 2**20}


def child_clip(placement):
    import numpy as np

    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    sys.path.insert(0, ROOT)
    from mindpretrain.training.train_step import ApplyUpdateCell

    rng = np.random.default_rng(2)
    params = [ms.Parameter(ms.Tensor(rng.standard_normal(CLIP_SHAPE, dtype=np.float32)), name=f"weight{index}")
              for index in range(CLIP_PARAMS)]
    grads = ms.mutable(tuple(ms.Tensor(rng.standard_normal(CLIP_SHAPE, dtype=np.float32)) for _ in params))
    optimizer = _optimizer(params, "fused")
    for moment in list(optimizer.exp_avg) + list(optimizer.exp_avg_sq):
        moment.set_data(ms.Tensor(np.zeros(moment.shape, np.float32)))
    lr, clip = ms.Tensor(1e-3, ms.float32), ms.Tensor(0.5, ms.float32)
    update = ApplyUpdateCell(optimizer) if placement == "scale_first" else (lambda g, r, c: optimizer(g, r, c))
    baseline = status_mib("VmRSS")
    reset = _reset_peak_rss()
    update(grads, lr, clip)
    float(params[0][0, 0].asnumpy())
    peak = status_mib("VmHWM")
    return {"placement": placement, "parameters": CLIP_PARAMS, "shape": list(CLIP_SHAPE),
            "gradients_mib": CLIP_PARAMS * CLIP_SHAPE[0] * CLIP_SHAPE[1] * 4 / 2**20,
            "peak_above_baseline_mib": peak - baseline if reset else None}


def child_tiny(implementation, steps):
    import numpy as np

    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    sys.path.insert(0, ROOT)
    from mindpretrain import registry
    from mindpretrain.config import load_config
    from mindpretrain.model_builder import build_model

    registry.import_register_path(os.path.join(ROOT, "research", "deepseek3"))
    _, model = build_model(load_config(TINY_CONFIG, []), "CPU")
    params = model.trainable_params()
    rng = np.random.default_rng(1)
    grads = ms.mutable(tuple(ms.Tensor(rng.standard_normal(p.shape, dtype=np.float32) * np.float32(1e-2))
                             for p in params))
    optimizer = _optimizer(params, implementation)
    lr = ms.Tensor(1e-3, ms.float32)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer(grads, lr)
        float(params[0][0].asnumpy().ravel()[0])
        times.append(time.perf_counter() - started)
    return {"implementation": implementation, "parameters": len(params),
            "elements": int(sum(int(np.prod(p.shape)) for p in params)), "first_update_seconds": times[0],
            "median_update_seconds": statistics.median(times[1:]), "update_seconds": times[1:]}




def _with_temporaries(result):
    """Adds the update's own allocation: the peak above the baseline less the two moments."""
    if result.get("peak_above_baseline_mib") is not None:
        result["temporaries_mib"] = result["peak_above_baseline_mib"] - 2 * result["parameter_mib"]
        result["temporaries_in_parameter_sizes"] = result["temporaries_mib"] / result["parameter_mib"]
    return result


def _one_parameter(implementation, rows, cols):
    needed = COMPOSITE_NEEDS * rows * cols * 4 / 2**20
    if implementation == "composite" and available_mib() < needed:
        return {"skipped": f"needs ~{needed:.0f} MiB, {available_mib():.0f} MiB available"}
    return _with_temporaries(_spawn("--child", implementation, "--child-part", "one", "--rows", str(rows),
                                    "--cols", str(cols)))


def _spawn(*arguments):
    out = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"exit code {out.returncode}", "stderr_tail": out.stderr.strip().splitlines()[-5:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=129280)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--tiny-steps", type=int, default=20, help="0 skips part 2")
    parser.add_argument("--skip-clip", action="store_true", help="skip part 3")
    parser.add_argument("--child", choices=IMPLEMENTATIONS + CLIP_PLACEMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-part", choices=("one", "tiny", "clip"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        parts = {"one": lambda: child_one_parameter(args.child, args.rows, args.cols),
                 "tiny": lambda: child_tiny(args.child, args.tiny_steps), "clip": lambda: child_clip(args.child)}
        result = parts[args.child_part]()
        print(json.dumps(result))
        return
    report = {"loadavg_before": os.getloadavg(), "one_parameter": {}, "tiny_model": {}, "clip_scaling": {}}
    for implementation in IMPLEMENTATIONS:
        report["one_parameter"][implementation] = _one_parameter(implementation, args.rows, args.cols)
        print("one parameter", json.dumps(report["one_parameter"][implementation]), flush=True)
    for implementation in IMPLEMENTATIONS if args.tiny_steps > 0 else ():
        report["tiny_model"][implementation] = _spawn("--child", implementation, "--child-part", "tiny",
                                                      "--tiny-steps", str(args.tiny_steps))
        summary = {key: value for key, value in report["tiny_model"][implementation].items()
                   if key != "update_seconds"}
        print("tiny model", json.dumps(summary), flush=True)
    for placement in CLIP_PLACEMENTS if not args.skip_clip else ():
        report["clip_scaling"][placement] = _spawn("--child", placement, "--child-part", "clip")
        print("clip scaling", json.dumps(report["clip_scaling"][placement]), flush=True)
    report["loadavg_after"] = os.getloadavg()
    sys.path.insert(0, ROOT)
    from mindpretrain.utils.atomic_files import atomic_write_json

    atomic_write_json(RESULT, report, make_parent=True, indent=2)
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
