"""Training: the shared loop (loop.py), optimizers and schedules (optim.py), checkpoints (checkpoint.py),
process groups and model wrapping (distributed.py), and the `myna pretrain` entry point (pretrain.py)."""
