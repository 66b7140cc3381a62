"""Where a converted graph runs on integer kernels: x86 CPUs through inductor and oneDNN (x86.py; the CPU's
int8 facts in x86_features.py), CUDA through `torch._int_mm` or torchao (cuda.py). Import the one you need."""
