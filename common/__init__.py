"""Shared helpers of the SP-PRM pipeline: data, models, rewards, losses, search, metrics, io."""
