"""Sampling: generating talking-portrait videos from a trained adapter and writing them out."""
