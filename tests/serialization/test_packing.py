"""Bit packing of low-bit weight codes: exact for every code, any length."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.serialization.packing import pack_int, packed_nbytes, storage_bits, unpack_int
from diffusion_ao.primitives import int_range


def _codes(bits):
    lo, hi = int_range(bits, signed=True)
    return st.lists(st.integers(lo, hi), min_size=0, max_size=257)


@settings(max_examples=200, deadline=None)
@given(values=_codes(4))
def test_4bit_pack_unpack_is_exact_and_two_codes_per_byte(values):
    codes = torch.tensor(values, dtype=torch.int8)
    packed = pack_int(codes, 4)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(values) + 1) // 2
    assert torch.equal(unpack_int(packed, 4, codes.shape), codes)


def test_every_4bit_code_round_trips_at_every_position_of_odd_lengths():
    for length in (1, 3, 15, 17):
        for value in range(-8, 8):
            codes = torch.full((length,), value, dtype=torch.int8)
            codes[::2] = -value - 1 if -8 <= -value - 1 <= 7 else 0
            assert torch.equal(unpack_int(pack_int(codes, 4), 4, (length,)), codes)


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_is_exact_for_every_width_and_shape(bits, data):
    values = data.draw(_codes(bits))
    cols = data.draw(st.sampled_from([1, 3]))
    values = values[: len(values) - len(values) % cols]
    codes = torch.tensor(values, dtype=torch.int8).reshape(-1, cols)
    packed = pack_int(codes, bits)
    assert packed.numel() == packed_nbytes(codes.numel(), bits) == (codes.numel() * storage_bits(bits) + 7) // 8
    assert torch.equal(unpack_int(packed, bits, codes.shape), codes)


def test_codes_outside_the_range_or_wrong_sizes_are_rejected():
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_int(torch.tensor([8], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="integer codes"):
        pack_int(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="does not match"):
        unpack_int(torch.zeros(3, dtype=torch.uint8), 4, (8,))
