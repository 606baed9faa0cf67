"""GPU kernels in Triton (run on CUDA, or on a CPU under TRITON_INTERPRET=1 for tests)."""
