"""Checkpoint conversion into files inference tools load."""
