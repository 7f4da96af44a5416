"""How many threads the project's own C++ kernels use (the host AdamW step, the fused label log-prob)."""
import os


def default_threads():
    """The run's OMP_NUM_THREADS, else every core."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else (os.cpu_count() or 1)
