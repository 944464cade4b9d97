"""The FantasyTalking model, its frozen encoders and the loaders of the real on-disk layouts."""
