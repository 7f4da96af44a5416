"""Checkpoint files: safetensors I/O, fp8 blocks, HF <-> native conversion."""
