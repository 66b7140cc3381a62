"""The diffusion-ao benchmark: `python bench/run.py` (see `bench/run.py --help`)."""
