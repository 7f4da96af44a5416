"""mindpretrain: DeepSeek-V3-style MoE pretraining on MindSpore, with MindFormers' conventions."""
__version__ = "0.1.0"
