"""Pre-flight cost model: memory, FLOPs and communication per device for a run's layout."""
