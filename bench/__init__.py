"""Benchmarks of the pack: reports run as `python -m bench.<name>` (see README, Benchmarks)."""
