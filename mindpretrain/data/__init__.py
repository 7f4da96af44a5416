"""Megatron-compatible pretraining data: indexed BIN files, GPT/blended datasets, preprocessing."""
