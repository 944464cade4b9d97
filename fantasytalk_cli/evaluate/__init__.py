"""`ftalk evaluate` and validation metrics: does the model use the audio (reliance), does it lip-sync (SyncNet)."""
