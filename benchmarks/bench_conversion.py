"""Conversion throughput (GB/s) and peak memory (RSS) on a synthetic multi-shard fp8 DeepSeek-V3 checkpoint.

The point of the converters is that memory is bounded by about a shard, not by the model (the issue's goal:
peak RSS <= 2 shards + 1 GB). This writes a synthetic checkpoint laid out like the official release (fp8 e4m3
2-D weights with float32 128x128 `weight_scale_inv`, bf16 embedding/head/norms/router, MTP layer, ~500 MB
shards), then runs, each in a fresh subprocess whose own `ru_maxrss` is reported:

  1. HF fp8 -> native bf16   (`convert_hf_to_native`: dequantisation + bf16 rounding)
  2. native bf16 -> HF fp8    (`convert_native_to_hf --fp8`: block re-quantisation)

GB/s counts bytes read + written per second of wall time. `rss_after_imports` is the child's peak before
converting (Python, NumPy and, through `research.deepseek3`, MindSpore), so the conversion's own share is visible.
Everything written is deleted at the end.

    python benchmarks/bench_conversion.py                 # ~3 GB in 6 shards
    python benchmarks/bench_conversion.py --experts 8     # smaller, quicker
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from mindpretrain.checkpoint.safetensors_io import SafetensorsWriter, float32_to_bf16_bits  # noqa: E402


def synthetic_config(experts):
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "moe_intermediate_size": 2048,
        "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 1,
        "n_routed_experts": experts, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 512,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1, "rope_scaling": None,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }


def release_tensors(config):
    """(name, shape) of the release layout, from the model's own table (MTP copies included)."""
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.weight_mapping import release_parameter_shapes

    cfg = DeepseekV3Config(**{k: v for k, v in config.items()
                              if k not in ("architectures", "model_type", "quantization_config")})
    return list(release_parameter_shapes(cfg).items())


def write_synthetic(directory, config, shard_bytes, seed=0):
    from mindpretrain.checkpoint.fp8 import quantised_in_release, scale_shape
    from research.deepseek3.deepseek3_config import DeepseekV3Config
    from research.deepseek3.weight_mapping import release_duplicates

    cfg = DeepseekV3Config(**{k: v for k, v in config.items()
                              if k not in ("architectures", "model_type", "quantization_config")})
    copies = release_duplicates(cfg)           # the release's MTP copies hold the same values as the originals
    rng = np.random.default_rng(seed)
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    groups, current, size = [], [], 0
    for name, shape in release_tensors(config):
        fp8 = quantised_in_release(name, len(shape))
        nbytes = int(np.prod(shape)) * (1 if fp8 else 2)
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape, fp8))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for index, group in enumerate(groups):
        file_name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        with SafetensorsWriter(os.path.join(directory, file_name), {"format": "pt"}) as writer:
            for name, shape, fp8 in group:
                if fp8:
                    codes = rng.integers(0x20, 0x70, size=shape, dtype=np.uint8)      # |value| in [2^-3, 2^7)
                    codes |= (rng.integers(0, 2, size=shape, dtype=np.uint8) << 7)
                    writer.add(name, codes, "F8_E4M3")
                    scales = rng.uniform(1e-5, 1e-3, size=scale_shape(shape)).astype(np.float32)
                    writer.add(name + "_scale_inv", scales)
                    weight_map[name + "_scale_inv"] = file_name
                    total += codes.nbytes + scales.nbytes
                elif name.endswith("e_score_correction_bias"):
                    writer.add(name, rng.standard_normal(shape).astype(np.float32) * 0.01)
                    total += 4 * int(np.prod(shape))
                else:
                    origin = copies.get(name, name)
                    seeded = np.random.default_rng([seed, sum(map(ord, origin)), len(origin)])
                    values = seeded.standard_normal(shape, dtype=np.float32) * 0.02
                    writer.add(name, float32_to_bf16_bits(values), "BF16")
                    total += 2 * int(np.prod(shape))
                weight_map[name] = file_name
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle)
    return len(groups), total


# Peak RSS is the kernel's high-water mark of this process's address space (VmHWM): `ru_maxrss` of a process
# started with fork+exec also carries the forking parent's RSS on Linux, which would blame the benchmark's
# own synthetic-data arrays on the converter. Worker processes (fork) report through RUSAGE_CHILDREN.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})

def high_water():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

from mindpretrain.checkpoint import conversion
import research.deepseek3                           # registers the model spec, before measuring
baseline = high_water()
start = time.perf_counter()
summary = getattr(conversion, {function!r})(*{args!r}, **{kwargs!r})
seconds = time.perf_counter() - start
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 if {workers} > 1 else 0
print("RESULT " + json.dumps({{"seconds": seconds, "peak_rss": max(high_water(), children),
                              "rss_after_imports": baseline, "mindspore_imported": "mindspore" in sys.modules}}))
"""


def run_child(function, args, kwargs):
    code = CHILD.format(root=ROOT, function=function, args=tuple(args), kwargs=kwargs,
                        workers=kwargs.get("workers", 1))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"{function} failed")
    line = [row for row in result.stdout.splitlines() if row.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def directory_bytes(directory):
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def largest_shard(directory):
    return max(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
               if n.endswith(".safetensors"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=56, help="routed experts per MoE layer (56: ~3 GB)")
    parser.add_argument("--shard-mb", type=int, default=500, help="source shard size in MB (default 500)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_conversion.", dir=args.work_dir)
    shard_bytes = args.shard_mb * 10 ** 6
    try:
        source = os.path.join(work, "hf_fp8")
        started = time.perf_counter()
        shards, _ = write_synthetic(source, synthetic_config(args.experts), shard_bytes)
        generate_s = time.perf_counter() - started
        source_bytes = directory_bytes(source)
        native, exported = os.path.join(work, "native"), os.path.join(work, "hf_out")
        runs = {}
        kwargs = {"workers": args.workers, "max_shard_size": f"{args.shard_mb}MB"}
        runs["hf_fp8_to_native_bf16"] = run_child("convert_hf_to_native", (source, native), dict(kwargs, dtype="bf16"))
        runs["hf_fp8_to_native_bf16"].update(read_bytes=source_bytes, written_bytes=directory_bytes(native))
        runs["native_bf16_to_hf_fp8"] = run_child("convert_native_to_hf", (native, exported),
                                                  dict(kwargs, quantise_fp8=True))
        runs["native_bf16_to_hf_fp8"].update(read_bytes=directory_bytes(native), written_bytes=directory_bytes(exported))
        largest = max(largest_shard(source), largest_shard(native), largest_shard(exported))
        report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                  "source": {"bytes": source_bytes, "shards": shards, "largest_shard_bytes": largest_shard(source),
                             "generate_s": round(generate_s, 1)},
                  "workers": args.workers, "goal_peak_rss_bytes": 2 * largest + 10 ** 9, "runs": {}}
        for label, run in runs.items():
            moved = run["read_bytes"] + run["written_bytes"]
            report["runs"][label] = {
                "seconds": round(run["seconds"], 2),
                "read_GB": round(run["read_bytes"] / 1e9, 3), "written_GB": round(run["written_bytes"] / 1e9, 3),
                "GB_per_s_read_plus_written": round(moved / 1e9 / run["seconds"], 3),
                "GB_per_s_read": round(run["read_bytes"] / 1e9 / run["seconds"], 3),
                "peak_rss_MB": round(run["peak_rss"] / 1e6), "rss_after_imports_MB": round(run["rss_after_imports"] / 1e6),
                "conversion_rss_MB": round((run["peak_rss"] - run["rss_after_imports"]) / 1e6),
                "largest_shard_MB": round(largest / 1e6),
                "within_goal": run["peak_rss"] <= 2 * largest + 10 ** 9,
                "mindspore_imported": run["mindspore_imported"]}
        print(json.dumps(report, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
