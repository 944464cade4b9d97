"""The feature cache: precomputed per-clip tensors stored as content-addressed safetensors files."""
