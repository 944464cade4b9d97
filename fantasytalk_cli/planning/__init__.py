"""Planning a run before it starts: the bucket plan's numbers, the memory estimate per bucket, the report."""
