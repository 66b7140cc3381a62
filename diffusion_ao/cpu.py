"""CPU facts that decide how activations are quantized for the oneDNN int8 kernels."""
from __future__ import annotations

import functools
import logging
import platform

logger = logging.getLogger(__name__)

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT16_MAX = 32767


@functools.lru_cache(maxsize=None)
def cpu_has_vnni() -> bool:
    """True if the CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX).

    Without it, oneDNN's u8 x s8 kernels add pairs of products in int16 (vpmaddubsw) and saturate.
    Read from /proc/cpuinfo; on platforms without it we assume no VNNI, which is the safe choice.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        logger.info("diffusion_ao: cannot read /proc/cpuinfo on %s; assuming no VNNI", platform.system())
        return False
    return any(flag in flags for flag in VNNI_FLAGS)


def int16_pair_overflows(weight_bits: int, act_bits: int) -> bool:
    """Whether two uint8-activation x int8-weight products can exceed int16 (the non-VNNI accumulation)."""
    return 2 * (2**act_bits - 1) * 2 ** (weight_bits - 1) > INT16_MAX
