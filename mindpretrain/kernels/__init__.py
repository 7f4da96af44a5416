"""The project's own CPU kernels for MindSpore graphs (custom "aot" ops built by setup.py)."""
