"""Text generation: model-independent sampling (`sampling`) over a plugin's cached decoder, and the
`run_mindformer.py --run_mode predict` driver (`predict`)."""
from mindpretrain.generation.sampling import (
    FINISH_LENGTH, FINISH_STOP, CachedDecoder, Completion, SamplingParams, generate)

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "CachedDecoder", "Completion", "SamplingParams", "generate"]
