"""quantbench: benchmark quantization methods on diffusion pipelines."""

__version__ = "0.1.0"
