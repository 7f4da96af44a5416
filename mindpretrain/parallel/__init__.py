"""Parallel layout of a run: validated config, pipeline placement, weight splits and op shard strategies."""
