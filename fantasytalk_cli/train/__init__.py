"""The training loop, its step, checkpoints and the distributed set-up."""
