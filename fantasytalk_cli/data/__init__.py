"""Training data: metadata, probing, validation, buckets, sampler, dataset, demo clips."""
