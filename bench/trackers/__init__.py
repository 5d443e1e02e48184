"""Measurement trackers: each a context manager around the measured work that yields a dataclass, filled when
the block ends (memory.py: peaks; latency.py: wall time and denoising-step ends). A new measurement (energy, for
one) is one more module here, and the cell's story (bench/worker.py) wraps its work in it."""
