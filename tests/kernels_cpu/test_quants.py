"""Dequantization kernels against the gguf package's numpy oracle, bit for bit."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from emulation import needs_real_madvise
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from llmapp.kernels_cpu import quants
from llmapp.kernels_cpu.f16 import bf16_bits_to_f32, f16_array_to_f32
from llmapp.runtime.files.ggml_types import TYPE_TRAITS

ALL_TYPES = quants.supported_types()

# Byte offsets of the f16 scale fields inside one block of each type.
F16_FIELDS: dict[int, tuple[int, ...]] = {
    quants.Q4_0: (0,),
    quants.Q4_1: (0, 2),
    quants.Q5_0: (0,),
    quants.Q5_1: (0, 2),
    quants.Q8_0: (0,),
    quants.IQ4_NL: (0,),
    quants.Q2_K: (80, 82),
    quants.Q3_K: (108,),
    quants.Q4_K: (0, 2),
    quants.Q5_K: (0, 2),
    quants.Q6_K: (208,),
}

# gguf's quantizer covers these (the K-quants only dequantize there).
ORACLE_QUANTIZES = (quants.Q4_0, quants.Q4_1, quants.Q5_0, quants.Q5_1, quants.Q8_0)


def finite_halves(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random f16 bit patterns, all finite (subnormals and zeros included)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32)
    all_ones_exp = (bits & 0x7C00) == 0x7C00
    bits[all_ones_exp] ^= 0x4000  # clear the top exponent bit: a finite number
    return bits.astype(np.uint16)


def random_rows(
    rng: np.random.Generator, ggml_type: int, n_rows: int, n_blocks: int, finite: bool = True
) -> np.ndarray:
    """uint8 [n_rows, n_blocks * type_size]: random bytes, scale fields finite when asked."""
    _, type_size = quants.block_traits(ggml_type)
    raw = rng.integers(0, 256, size=(n_rows * n_blocks, type_size), dtype=np.uint8)
    if finite:
        if ggml_type == quants.F32:
            raw = np.asarray(rng.standard_normal(raw.shape[0], dtype=np.float32)).view(np.uint8)
        elif ggml_type == quants.F16:
            raw = finite_halves(rng, raw.shape[0]).view(np.uint8).reshape(-1, 2)
        elif ggml_type in F16_FIELDS:
            for off in F16_FIELDS[ggml_type]:
                halves = finite_halves(rng, raw.shape[0])
                raw[:, off : off + 2] = halves.view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(raw.reshape(n_rows, n_blocks * type_size))


def reference(raw: np.ndarray, ggml_type: int, row_len: int) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 scales in raw-byte blocks
        ref = oracle.dequantize(raw, GGMLQuantizationType(ggml_type))
    return np.asarray(ref, dtype=np.float32).reshape(-1, row_len)


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray) -> None:
    """Equal bits everywhere except inside NaNs, whose payload arithmetic may choose."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def row_len_of(ggml_type: int, n_blocks: int) -> int:
    return quants.block_traits(ggml_type)[0] * n_blocks


# ----------------------------------------------------------------------------------------------
# Half and bfloat16 decoding


def test_f16_decode_every_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = f16_array_to_f32(bits).view(np.uint32)
    half = bits.view(np.float16)
    nan = np.isnan(half)
    # Every number (infinities included) exactly as numpy's cast gives it.
    ref = half[~nan].astype(np.float32).view(np.uint32)
    assert np.array_equal(ours[~nan], ref)
    # NaNs by the rule itself, not numpy's cast: sign kept, exponent all ones, the 10-bit
    # payload moved up 13 bits and not quieted. (numpy's cast keeps signalling NaNs on x86 but
    # sets their quiet bit on aarch64, where the hardware conversion does.)
    wide = bits[nan].astype(np.uint32)
    want = ((wide & 0x8000) << 16) | np.uint32(0xFF << 23) | ((wide & 0x3FF) << 13)
    assert np.array_equal(ours[nan], want)
    assert nan.sum() == 2 * 1023


def test_bf16_decode() -> None:
    for bits in (0x0000, 0x8000, 0x3F80, 0xBF80, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x7F7F):
        want = np.array([bits << 16], dtype=np.uint32).view(np.float32)[0]
        assert np.float32(bf16_bits_to_f32(bits)).view(np.uint32) == want.view(np.uint32)


# ----------------------------------------------------------------------------------------------
# Parity with the oracle


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: GGMLQuantizationType(t).name)
@pytest.mark.parametrize("finite", [True, False], ids=["finite-scales", "raw-bytes"])
def test_random_blocks_match_oracle(ggml_type: int, finite: bool) -> None:
    rng = np.random.default_rng(1000 + ggml_type)
    n_blocks = 3 if quants.block_traits(ggml_type)[0] == 256 else 9
    raw = random_rows(rng, ggml_type, 7, n_blocks, finite)
    row_len = row_len_of(ggml_type, n_blocks)
    ref = reference(raw, ggml_type, row_len)
    for parallel in (False, True):
        assert_bit_exact(quants.dequantize(raw, ggml_type, row_len, parallel=parallel), ref)


@pytest.mark.parametrize("ggml_type", ORACLE_QUANTIZES, ids=lambda t: GGMLQuantizationType(t).name)
def test_quantized_blocks_match_oracle(ggml_type: int) -> None:
    rng = np.random.default_rng(ggml_type)
    x = rng.standard_normal((6, 128), dtype=np.float32) * np.float32(3.0)
    x[1] = 0.0  # an all-zero row: d = 0
    x[2] *= np.float32(1e-6)  # tiny scales: subnormal halves
    raw = oracle.quantize(x, GGMLQuantizationType(ggml_type))
    assert_bit_exact(quants.dequantize(raw, ggml_type, 128), reference(raw, ggml_type, 128))


@settings(max_examples=120, deadline=None)
@given(
    ggml_type=st.sampled_from(ALL_TYPES),
    n_rows=st.integers(1, 9),
    n_blocks=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    finite=st.booleans(),
)
def test_shapes_match_oracle(
    ggml_type: int, n_rows: int, n_blocks: int, seed: int, finite: bool
) -> None:
    rng = np.random.default_rng(seed)
    raw = random_rows(rng, ggml_type, n_rows, n_blocks, finite)
    row_len = row_len_of(ggml_type, n_blocks)
    ref = reference(raw, ggml_type, row_len)
    assert_bit_exact(quants.dequantize(raw, ggml_type, row_len), ref)
    # The same bytes handed over flat give the same rows.
    assert_bit_exact(quants.dequantize(raw.reshape(-1), ggml_type, row_len), ref)
    row = int(rng.integers(0, n_rows))
    out = np.empty(row_len, dtype=np.float32)
    quants.dequantize_row_into(raw, ggml_type, row_len, row, out)
    assert_bit_exact(out[None, :], ref[row : row + 1])


# ----------------------------------------------------------------------------------------------
# Selected rows


def test_dequantize_rows_reads_only_its_rows() -> None:
    rng = np.random.default_rng(7)
    ggml_type, n_blocks = quants.Q6_K, 2
    row_len = row_len_of(ggml_type, n_blocks)
    raw = random_rows(rng, ggml_type, 12, n_blocks)
    wanted = np.array([3, 9, 3, -1], dtype=np.int64)
    ref = reference(raw, ggml_type, row_len)[wanted]
    # Poison every other row: a NaN scale would spread NaN through anything read from it.
    blocks = raw.copy().reshape(12, n_blocks, -1)
    others = np.setdiff1d(np.arange(12), wanted % 12)
    blocks[others, :, 208:210] = np.frombuffer(b"\x00\x7e", dtype=np.uint8)  # d = NaN
    poisoned = blocks.reshape(12, -1)
    assert_bit_exact(quants.dequantize_rows(poisoned, ggml_type, row_len, wanted), ref)
    # A strided view (rows inside a wider buffer) is gathered, not copied whole.
    wide = np.zeros((12, raw.shape[1] + 5), dtype=np.uint8)
    wide[:, 2 : 2 + raw.shape[1]] = poisoned
    strided = wide[:, 2 : 2 + raw.shape[1]]
    assert_bit_exact(quants.dequantize_rows(strided, ggml_type, row_len, wanted), ref)


def _resident_pages(addr: int, length: int) -> np.ndarray:
    libc = ctypes.CDLL(None, use_errno=True)
    n_pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n_pages)()
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
    return np.frombuffer(bytes(vec), dtype=np.uint8) & 1


@pytest.mark.skipif(sys.platform != "linux", reason="uses mincore and posix_fadvise")
@needs_real_madvise
def test_dequantize_rows_faults_only_its_pages(tmp_path: Path) -> None:
    """On a memory-mapped file, only the requested row's pages enter memory."""
    ggml_type, n_rows = quants.Q8_0, 8
    n_blocks = mmap.PAGESIZE // 2  # 34 * n_blocks bytes: a whole number of pages per row
    row_len = row_len_of(ggml_type, n_blocks)
    raw = random_rows(np.random.default_rng(3), ggml_type, n_rows, n_blocks)
    row_pages = raw.shape[1] // mmap.PAGESIZE
    path = tmp_path / "rows.bin"
    with open(path, "wb") as f:
        f.write(raw.tobytes())
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        mm.madvise(mmap.MADV_RANDOM)  # no read-ahead into neighbouring rows
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        data = np.frombuffer(mm, dtype=np.uint8).reshape(n_rows, -1)
        addr = data.ctypes.data
        if _resident_pages(addr, raw.nbytes).any():
            pytest.skip("this filesystem keeps the file's pages in memory")
        got = quants.dequantize_rows(data, ggml_type, row_len, np.array([5]))
        resident = _resident_pages(addr, raw.nbytes)
        del data
        mm.close()
    finally:
        os.close(fd)
    assert_bit_exact(got, reference(raw, ggml_type, row_len)[5:6])
    expected = np.zeros_like(resident)
    expected[5 * row_pages : 6 * row_pages] = 1
    assert np.array_equal(resident, expected)


# ----------------------------------------------------------------------------------------------
# Inputs and errors


def test_read_only_memmap_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    raw = random_rows(rng, quants.Q4_K, 5, 2)
    path = tmp_path / "t.bin"
    raw.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    ref = reference(raw, quants.Q4_K, 512)
    assert_bit_exact(quants.dequantize(mapped, quants.Q4_K, 512), ref)
    assert_bit_exact(
        quants.dequantize_rows(mapped, quants.Q4_K, 512, np.array([4, 0])), ref[[4, 0]]
    )


def test_float_dtypes_are_taken_as_bytes() -> None:
    x = np.random.default_rng(5).standard_normal((3, 8), dtype=np.float32)
    assert np.array_equal(quants.dequantize(x, quants.F32, 8), x)
    h = x.astype(np.float16)
    assert np.array_equal(quants.dequantize(h, quants.F16, 8), h.astype(np.float32))


def test_table_matches_format_facts() -> None:
    assert set(ALL_TYPES) == set(TYPE_TRAITS)
    for t in ALL_TYPES:
        traits = TYPE_TRAITS[t]
        assert quants.block_traits(t) == (traits.block_size, traits.type_size)
        assert quants.block_traits(t) == GGML_QUANT_SIZES[GGMLQuantizationType(t)]


def test_errors() -> None:
    raw = np.zeros((2, 34), dtype=np.uint8)
    with pytest.raises(ValueError, match="type 15"):
        quants.dequantize(raw, 15, 32)
    with pytest.raises(ValueError, match="multiple"):
        quants.dequantize(raw, quants.Q8_0, 48)
    with pytest.raises(ValueError, match="whole rows"):
        quants.dequantize(raw.reshape(-1)[:50], quants.Q8_0, 32)
    with pytest.raises(IndexError):
        quants.dequantize_rows(raw, quants.Q8_0, 32, np.array([2]))
    with pytest.raises(IndexError):
        quants.dequantize_row_into(raw, quants.Q8_0, 32, -3, np.empty(32, np.float32))
    with pytest.raises(ValueError, match="float32"):
        quants.dequantize_row_into(raw, quants.Q8_0, 32, 0, np.empty(32, np.float64))
    assert quants.dequantize_rows(raw, quants.Q8_0, 32, np.array([], np.int64)).shape == (0, 32)
