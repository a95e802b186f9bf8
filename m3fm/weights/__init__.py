"""What travels between sites and the coordinator about weights: packing a state dict (packing.py) and the
parameter groups the task-aware aggregation averages over (groups.py). Nothing here imports Flower."""
