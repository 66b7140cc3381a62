"""CPU facts that decide how activations are quantized for the oneDNN int8 kernels.

Whether oneDNN's u8 x s8 kernels have an int8 dot-product instruction (VNNI) depends on two things: what the CPU
has (/proc/cpuinfo) and the highest instruction set oneDNN is allowed to use. A user (or a CI job emulating an
older machine) can cap the latter with the environment variable `ONEDNN_MAX_CPU_ISA` (older name:
`DNNL_MAX_CPU_ISA`), e.g. `ONEDNN_MAX_CPU_ISA=AVX2` on an AVX-512 VNNI machine runs the AVX2 kernels, which add
pairs of products in int16 and overflow on full-range 8-bit activations. `cpu_has_vnni` reads both.

The flags do not decide alone: whether int16 pair sums saturate is a property of the kernel (on an AVX2 CPU
oneDNN's `qconv` / `qlinear` saturate at full range while `torch._int_mm` is exact). `int8_kernel_saturates`
therefore asks the kernel itself: it runs it once per process on codes whose pair sums exceed int16 and compares
with the exact result. The quantizer takes its one-bit-reduced activation ranges from that answer.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from typing import Iterable, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT16_MAX = 32767

# The environment variables oneDNN reads for its ISA cap, in its order: a non-empty ONEDNN_ value wins, an empty
# one counts as unset (checked on oneDNN 3.x as shipped with torch: `ONEDNN_MAX_CPU_ISA=ALL DNNL_MAX_CPU_ISA=AVX2`
# runs the AVX-512 kernels; `ONEDNN_MAX_CPU_ISA= DNNL_MAX_CPU_ISA=AVX2` the AVX2 ones). Values are case-insensitive.
ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")

# oneDNN's `dnnl_cpu_isa_t` bit masks (dnnl_types.h). oneDNN may use an ISA under a cap when the ISA's bits are a
# subset of the cap's: AVX2_VNNI (0xf) is *not* under AVX512_CORE (0x27) nor AVX512_CORE_VNNI (0x67).
ONEDNN_ISA_BITS = {
    "SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F,
    "AVX512_CORE": 0x27, "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7,
    "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF, "AVX512_CORE_AMX": 0xFEF,
    "AVX10_1_512_AMX_FP16": 0x1FEF, "AVX512_CORE_AMX_FP16": 0x1FEF,
}
# Caps that do not limit anything.
ONEDNN_NO_CAP = ("", "ALL", "DEFAULT")
# Xeon Phi ISAs of older oneDNN releases (no int8 dot product; oneDNN 3.x ignores these names).
_NO_VNNI_PREFIXES = ("AVX512_MIC",)

# The int8 dot-product ISAs: the /proc/cpuinfo flag each needs and its oneDNN ISA.
_VNNI_ISAS = (("avx_vnni", "AVX2_VNNI"), ("avx512_vnni", "AVX512_CORE_VNNI"), ("amx_int8", "AVX512_CORE_AMX"))


def onednn_isa_cap(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The ISA cap oneDNN runs under, upper-cased (e.g. "AVX2"), or None when there is none.

    Read from `ONEDNN_MAX_CPU_ISA`, else `DNNL_MAX_CPU_ISA` (see `ONEDNN_ISA_ENV`); "ALL" and "DEFAULT" are no cap.
    """
    env = os.environ if environ is None else environ
    for name in ONEDNN_ISA_ENV:
        value = env.get(name, "").strip()
        if value:
            value = value.upper()
            return None if value in ONEDNN_NO_CAP else value
    return None


def _cap_bits(cap: str) -> Optional[int]:
    """The bit mask of a cap name; None for a name we cannot place."""
    if cap in ONEDNN_ISA_BITS:
        return ONEDNN_ISA_BITS[cap]
    if cap.startswith(_NO_VNNI_PREFIXES):
        return ONEDNN_ISA_BITS["AVX2"]  # no dot product, whatever else it has
    if "AMX" in cap:  # a newer AMX level: everything the known AMX levels allow
        return ONEDNN_ISA_BITS["AVX10_1_512_AMX_FP16"]
    if cap.startswith("AVX10_"):  # a newer AVX10 level: a superset of AVX10.1 (VNNI in both encodings)
        return ONEDNN_ISA_BITS["AVX10_1_512"]
    return None


def vnni_available(cpu_flags: Iterable[str], cap: Optional[str] = None) -> bool:
    """Whether oneDNN's int8 kernels get a dot-product instruction on a CPU with `cpu_flags` under ISA `cap`.

    Args:
        cpu_flags: the CPU's flags as in /proc/cpuinfo (e.g. {"avx2", "avx512_vnni"}).
        cap: an `ONEDNN_MAX_CPU_ISA` value (see `onednn_isa_cap`); None: no cap. An unknown name gives False
            (the safe choice: a reduced activation range costs one bit, an overflow costs the output).
    """
    flags = set(cpu_flags)
    if cap is None or cap.upper() in ONEDNN_NO_CAP:
        allowed = ~0
    else:
        bits = _cap_bits(cap.upper())
        if bits is None:
            logger.warning("diffusion_ao: ONEDNN_MAX_CPU_ISA=%s is not an ISA name diffusion-ao knows; assuming "
                           "oneDNN has no VNNI (one-bit-reduced activation ranges where 8-bit ones could "
                           "overflow)", cap)
            return False
        allowed = bits
    return any(flag in flags and ONEDNN_ISA_BITS[isa] & allowed == ONEDNN_ISA_BITS[isa] for flag, isa in _VNNI_ISAS)


def read_cpu_flags(path: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """The CPU flags listed in `path` (Linux /proc/cpuinfo), or None if it cannot be read."""
    try:
        with open(path) as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def cpu_has_vnni() -> bool:
    """True if oneDNN's int8 kernels have an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX) here.

    Without it, oneDNN's u8 x s8 kernels add pairs of products in int16 (vpmaddubsw) and saturate. Two things
    decide: the CPU's flags (/proc/cpuinfo; on platforms without it we assume no VNNI, which is the safe choice)
    and an ISA cap set with `ONEDNN_MAX_CPU_ISA` / `DNNL_MAX_CPU_ISA`: a cap without VNNI (SSE41, AVX, AVX2,
    AVX512_CORE, AVX512_MIC*, or AVX2_VNNI on a CPU whose VNNI is the AVX-512 one) makes oneDNN run the int16
    kernels on any CPU. Caps with VNNI: AVX2_VNNI* (on CPUs with AVX-VNNI), AVX512_CORE_VNNI, AVX512_CORE_BF16,
    AVX512_CORE_FP16, AVX10*, *AMX*; "ALL" / "DEFAULT" are no cap.

    The answer is cached for the process, as oneDNN reads its cap once; set the variable before the first call.
    """
    flags = read_cpu_flags()
    if flags is None:
        logger.info("diffusion_ao: cannot read /proc/cpuinfo on %s; assuming no VNNI", platform.system())
        return False
    cap = onednn_isa_cap()
    has = vnni_available(flags, cap)
    if cap is not None and not has and vnni_available(flags):
        logger.info("diffusion_ao: the CPU has VNNI but ONEDNN_MAX_CPU_ISA=%s keeps oneDNN off it", cap)
    return has


INT8_KERNELS = ("qconv", "qlinear", "int_mm")
LOWERED_KERNELS = ("qconv", "qlinear")  # what `compile_for_cpu` lowers quantized convs and linears to


def _probe_qlinear() -> tuple[float, float]:
    k, n = 64, 32
    x = torch.full((16, k), 255, dtype=torch.uint8)
    w = torch.full((n, k), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, [16, k])
    out = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.long),
                                             None, 1.0, 0, torch.float32, "none", [None], "")
    return float(out.max()), 255.0 * 127 * k


def _probe_qconv() -> tuple[float, float]:
    c = 32
    x = torch.full((1, c, 6, 6), 255, dtype=torch.uint8)
    w = torch.full((c, c, 3, 3), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qconv_prepack(w, torch.ones(c), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, (1, c, 6, 6))
    out = torch.ops.onednn.qconv_pointwise(x, 1.0, 0, packed, torch.ones(c), torch.zeros(c, dtype=torch.long), None,
                                           [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    return float(out.max()), 255.0 * 127 * c * 9


def _probe_int_mm() -> tuple[float, float]:
    # s8 x s8: a kernel that shifts the left side to uint8 (code + 128) sees 255 x 127 pairs for 127 x 127
    a = torch.full((32, 64), 127, dtype=torch.int8)
    b = torch.full((64, 32), 127, dtype=torch.int8)
    return float(torch._int_mm(a, b).max()), 127.0 * 127 * 64


_PROBES = {"qconv": _probe_qconv, "qlinear": _probe_qlinear, "int_mm": _probe_int_mm}


@functools.lru_cache(maxsize=None)
def int8_kernel_saturates(kernel: str) -> bool:
    """Whether the int8 `kernel` on this CPU (under oneDNN's ISA cap) saturates int16 pair sums on full-range
    8-bit codes, i.e. needs one-bit-reduced activations wherever `int16_pair_overflows` says a pair can overflow.

    Measured, not inferred: the kernel runs once per process on codes whose every pair of products exceeds int16
    (255 x 127 for oneDNN's uint8 x int8 `qconv` / `qlinear`, 127 x 127 for `torch._int_mm`) and its result is
    compared with the exact one. Where the kernel cannot run (no oneDNN int8 kernels on this platform), the answer
    is the CPU flags' (`not cpu_has_vnni()`).

    Args:
        kernel: "qconv", "qlinear" (oneDNN's, what `compile_for_cpu` lowers to) or "int_mm" (`torch._int_mm`,
            the CPU stand-in of `lower_to_int_mm`).
    """
    if kernel not in _PROBES:
        raise ValueError(f"kernel={kernel!r} is not one diffusion-ao probes: choose one of {INT8_KERNELS}.")
    try:
        with torch.no_grad():
            got, exact = _PROBES[kernel]()
    except (RuntimeError, AttributeError, NotImplementedError) as err:  # no such kernel here
        logger.info("diffusion_ao: cannot run the int8 %s kernel here (%s); taking the CPU flags' answer",
                    kernel, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return not cpu_has_vnni()
    saturates = got != exact
    logger.info("diffusion_ao: the int8 %s kernel here %s int16 pair sums (probe: %g, exact %g)", kernel,
                "saturates" if saturates else "does not saturate", got, exact)
    return saturates


def int16_pair_overflows(weight_bits: int, act_bits: int) -> bool:
    """Whether two uint8-activation x int8-weight products can exceed int16 (the non-VNNI accumulation)."""
    return 2 * (2**act_bits - 1) * 2 ** (weight_bits - 1) > INT16_MAX
