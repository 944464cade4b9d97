"""ftalk: the training toolkit for FantasyTalking (audio-driven talking portraits on Wan2.1-I2V-14B)."""

__version__ = "0.1.0"
