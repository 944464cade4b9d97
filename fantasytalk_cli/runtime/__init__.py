"""What training, sampling and caching share at run time: dtypes, the flow schedule, memory options, block offload."""
