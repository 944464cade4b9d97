"""Checkpoints: their layout and names, finding them, their manifest, and reading any kind of them safely."""
