"""normlab's compiled kernels: the C++ sources (csrc/) and their loader (loader.py)."""
