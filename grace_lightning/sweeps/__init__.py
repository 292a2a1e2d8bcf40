"""Sweeps: W&B sweep files read offline, their Hydra multirun equivalents, sweep reports."""
