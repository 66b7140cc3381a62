"""Bit packing of low-bit integer codes: 4-bit weights two per byte (2-bit four per byte, 1-bit eight).

Quantized weights live in int8 tensors in the graph (the kernels' format) even when their range is narrower;
on disk, codes of b <= 4 bits are packed at `storage_bits(b)` bits each. Packing is exact for every code in
the signed range of `bits` and works for any number of elements (the last byte is zero-padded).
"""
from __future__ import annotations

import torch

from diffusion_ao.primitives import int_range

PACKABLE_WIDTHS = (1, 2, 4)


def storage_bits(bits: int) -> int:
    """Bits per code on disk: the smallest of 1, 2, 4, 8 that holds a `bits`-bit code.

    Example:
        >>> storage_bits(4), storage_bits(3), storage_bits(6)
        (4, 4, 8)
    """
    int_range(bits, signed=True)  # validates 1..8
    return next(w for w in (1, 2, 4, 8) if w >= bits)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take once packed."""
    width = storage_bits(bits)
    return (numel * width + 7) // 8


def pack_int(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs signed `bits`-bit integer codes (any integer dtype, any shape) into a flat uint8 tensor.

    Codes are stored in two's complement at `storage_bits(bits)` bits, the first code in the lowest bits.

    Args:
        codes: integer tensor whose values lie in the signed range of `bits`.
        bits: 1..8.

    Raises:
        ValueError: if a code lies outside the signed `bits`-bit range, or `codes` is not an integer tensor.

    Example:
        >>> pack_int(torch.tensor([-8, 7, 1], dtype=torch.int8), 4)
        tensor([120,   1], dtype=torch.uint8)
    """
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"pack_int needs integer codes, got dtype {codes.dtype}.")
    lo, hi = int_range(bits, signed=True)
    flat = codes.detach().reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min().item() < lo or flat.max().item() > hi):
        raise ValueError(f"codes lie in [{flat.min().item()}, {flat.max().item()}], outside the {bits}-bit range "
                         f"[{lo}, {hi}]: they cannot be packed at {bits} bits.")
    width = storage_bits(bits)
    if width == 8:
        return flat.to(torch.int8).view(torch.uint8).clone()
    per_byte = 8 // width
    unsigned = (flat & (2**width - 1)).to(torch.uint8)  # two's complement in `width` bits
    pad = (-unsigned.numel()) % per_byte
    if pad:
        unsigned = torch.cat([unsigned, unsigned.new_zeros(pad)])
    lanes = unsigned.reshape(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    return (lanes << shifts).sum(dim=1).to(torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size,
               dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of `pack_int`: the codes, reshaped to `shape`, as `dtype`.

    Raises:
        ValueError: if `packed` is not uint8 or has the wrong length for `shape`.

    Example:
        >>> unpack_int(pack_int(torch.tensor([-8, 7, 1]), 4), 4, (3,))
        tensor([-8,  7,  1], dtype=torch.int8)
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed data does not match: expected a flat uint8 tensor of {packed_nbytes(numel, bits)} "
                         f"bytes for {numel} {bits}-bit codes, got {packed.dtype} of shape {tuple(packed.shape)}.")
    width = storage_bits(bits)
    if width == 8:
        return packed.view(torch.int8).reshape(shape).to(dtype)
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    lanes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**width - 1)
    flat = lanes.reshape(-1)[:numel]
    signed = torch.where(flat >= 2 ** (width - 1), flat - 2**width, flat)  # back from two's complement
    return signed.reshape(shape).to(dtype)
