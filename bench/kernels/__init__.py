"""Layer-level microbenchmarks: one quantized `nn.Linear` per method at FLUX.1-dev's shapes, built the way
diffusers builds it, plus the device's measured peaks for a roofline. The pytest-benchmark suite lives in
`tests/kernels/`; the report reads its JSON."""
