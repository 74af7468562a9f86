"""Ray Train: the run plan, objectives, strategies, checkpoints, the worker loop, the driver."""
