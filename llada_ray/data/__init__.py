"""Data on Ray: corpus sources, packing with document boundaries, SFT/DPO rows, the task family."""
