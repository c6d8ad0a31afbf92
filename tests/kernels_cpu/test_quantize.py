"""Quantizers: round trips through the gguf oracle, bytes against gguf's and llama.cpp's own
quantizers, error bounds, and hostile values (zeros, constants, huge and tiny magnitudes)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from bench_loader import load_benchmark
from gguf import GGMLQuantizationType
from gguf import quants as oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from llmapp.kernels_cpu import quantize as kq

TYPES = kq.quantizable_types()
NAMES = {t: GGMLQuantizationType(t).name for t in TYPES}

# gguf implements quantization only for these; its results are meant to match llama.cpp's.
ORACLE_QUANTIZES = (kq.Q4_0, kq.Q4_1, kq.Q5_0, kq.Q5_1, kq.Q8_0)

# RMS error on N(0, 1) data is at most this (measured: 0.0054, 0.086, 0.043, 0.078, 0.038,
# 0.076, 0.296, 0.151, 0.071, 0.036, 0.018, identical to llama.cpp's quantizers).
RMS_BOUND = {
    kq.Q8_0: 0.006,
    kq.Q4_0: 0.095,
    kq.Q5_0: 0.048,
    kq.Q4_1: 0.087,
    kq.Q5_1: 0.043,
    kq.IQ4_NL: 0.085,
    kq.Q2_K: 0.33,
    kq.Q3_K: 0.17,
    kq.Q4_K: 0.08,
    kq.Q5_K: 0.04,
    kq.Q6_K: 0.02,
}


def dequant(q: np.ndarray, t: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(oracle.dequantize(q, GGMLQuantizationType(t))).reshape(shape)


def distributions(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (16, 512)
    return {
        "normal": rng.standard_normal(shape),
        "laplace": rng.laplace(size=shape) * 0.02,
        "uniform": rng.uniform(-3, 1, shape),
        "heavy": rng.standard_t(2, size=shape) * 1e-3,
        "sparse": np.where(rng.random(shape) < 0.05, rng.standard_normal(shape), 0.0),
        "positive": rng.random(shape) + 0.5,
        "negative": -rng.random(shape) - 0.5,
    }


def edge_rows() -> dict[str, np.ndarray]:
    shape = (4, 512)
    rng = np.random.default_rng(7)
    onehot = np.zeros(shape)
    onehot[np.arange(4), [0, 100, 300, 511]] = [5.0, -3.0, 1e-3, 40.0]
    return {
        "zeros": np.zeros(shape),
        "const+": np.full(shape, 0.37),
        "const-": np.full(shape, -0.37),
        "onehot": onehot,
        "tiny": rng.standard_normal(shape) * 1e-30,
        "big": rng.standard_normal(shape) * 1e4,
    }


# ----------------------------------------------------------------------------------------------
# Shapes and errors


@pytest.mark.parametrize("t", TYPES, ids=lambda t: NAMES[t])
def test_shape_and_row_bytes(t: int) -> None:
    block = 256 if t in (kq.Q2_K, kq.Q3_K, kq.Q4_K, kq.Q5_K, kq.Q6_K) else 32
    x = np.zeros((3, 2 * block), np.float32)
    q = kq.quantize(x, t)
    assert q.dtype == np.uint8
    assert q.shape == (3, kq.quantized_row_bytes(t, 2 * block))
    assert kq.quantize(np.zeros((0, block), np.float32), t).shape == (0, q.shape[1] // 2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no quantizer"):
        kq.quantize(np.zeros((1, 256), np.float32), 99)
    with pytest.raises(ValueError, match="multiple of 256"):
        kq.quantize(np.zeros((1, 96), np.float32), kq.Q4_K)
    with pytest.raises(ValueError, match="2-D"):
        kq.quantize(np.zeros(256, np.float32), kq.Q8_0)
    bad = np.zeros((1, 32), np.float32)
    bad[0, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        kq.quantize(bad, kq.Q8_0)


def test_float_targets() -> None:
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    assert np.array_equal(kq.quantize(x, kq.F16).view(np.float16), x.astype(np.float16))
    assert np.array_equal(kq.quantize(x, kq.F32).view(np.float32), x)


# ----------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("t", TYPES, ids=lambda t: NAMES[t])
def test_round_trip_error_on_gaussian(t: int) -> None:
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    y = dequant(kq.quantize(x, t), t, x.shape)
    rms = float(np.sqrt(np.mean((y - x) ** 2)))
    assert rms < RMS_BOUND[t]


@pytest.mark.parametrize("t", ORACLE_QUANTIZES, ids=lambda t: NAMES[t])
@pytest.mark.parametrize("dist", list(distributions(0)))
def test_bytes_match_gguf_quantizer(t: int, dist: str) -> None:
    x = distributions(1)[dist].astype(np.float32)
    ours = kq.quantize(x, t)
    theirs = oracle.quantize(x, GGMLQuantizationType(t))
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: NAMES[t])
@pytest.mark.parametrize("case", list(edge_rows()))
def test_edge_rows_round_trip(t: int, case: str) -> None:
    x = edge_rows()[case].astype(np.float32)
    y = dequant(kq.quantize(x, t), t, x.shape)
    assert np.isfinite(y).all()
    amax = float(np.abs(x).max())
    if case in ("zeros",):
        assert not y.any()
    elif case.startswith("const"):
        # A constant row is the easy case for every type: well inside 2% of its value.
        assert np.abs(y - x).max() <= 0.02 * amax
    else:
        assert np.abs(y - x).max() <= 1.01 * amax


def test_rounding_helpers_match_numpy() -> None:
    rng = np.random.default_rng(5)
    v = np.concatenate(
        [rng.uniform(-4e6, 4e6, 4000), np.arange(-20.5, 20.5, 0.5), rng.standard_normal(4000)]
    ).astype(np.float32)
    assert [kq._nearest_int(np.float32(a)) for a in v] == np.rint(v).astype(int).tolist()
    halves = np.concatenate(
        [rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 5, 5000), [6e-8, 3e-8, 65504.0]]
    ).astype(np.float32)
    ours = np.array([kq._f16_bits(np.float32(a)) for a in halves], dtype=np.uint16)
    assert np.array_equal(ours, halves.astype(np.float16).view(np.uint16))
    assert kq._f16_bits(np.float32(1e6)) == 0x7BFF  # saturates instead of inf
    assert kq._f16_bits(np.float32(-1e6)) == 0xFBFF


# ----------------------------------------------------------------------------------------------
# Hypothesis: any shape, any finite values -> blocks that decode to finite values


@st.composite
def row_batches(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    t = draw(st.sampled_from(TYPES))
    block = 256 if t in (kq.Q2_K, kq.Q3_K, kq.Q4_K, kq.Q5_K, kq.Q6_K) else 32
    n_rows = draw(st.integers(1, 3))
    n_blocks = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["normal", "const", "zeros", "sparse", "mixed-scale"]))
    scale = draw(st.sampled_from([1e-38, 1e-30, 1e-8, 1e-2, 1.0, 1e3, 6e4, 1e8, 1e20, 3e38]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = (n_rows, n_blocks * block)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "const":
        x = np.full(shape, rng.choice([-1.0, 1.0]))
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "sparse":
        x = np.where(rng.random(shape) < 0.1, rng.standard_normal(shape), 0.0)
    else:
        x = rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, shape)
    x = np.clip(x * scale / max(1.0, float(np.abs(x).max())), -3e38, 3e38)
    return t, x.astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(row_batches())
def test_any_finite_input_gives_finite_blocks(case: tuple[int, np.ndarray]) -> None:
    t, x = case
    q = kq.quantize(x, t)
    assert q.shape == (x.shape[0], kq.quantized_row_bytes(t, x.shape[1]))
    with np.errstate(over="ignore", invalid="ignore"):
        y = dequant(q, t, x.shape)
    assert np.isfinite(y).all()
    amax = float(np.abs(x).max())
    if amax < 6e4:  # scales still fit an f16: the error stays within the data's range
        assert float(np.abs(y.astype(np.float64) - x).max()) <= 1.01 * amax + 1e-30


# ----------------------------------------------------------------------------------------------
# The peer: llama.cpp's own quantizer (ggml_quantize_chunk) on the same rows


def _bench() -> ModuleType:
    return load_benchmark("bench_quantize")


@pytest.mark.peer
@pytest.mark.parametrize("t", TYPES, ids=lambda t: NAMES[t])
def test_bytes_match_llama_cpp(t: int) -> None:
    pytest.importorskip("llama_cpp")
    bench = _bench()
    cases = {**distributions(3), **edge_rows()}
    for name, x in cases.items():
        x = x.astype(np.float32)
        ours, theirs = kq.quantize(x, t), bench.llama_quantize_rows(x, t)
        assert np.array_equal(ours, theirs), f"{NAMES[t]} differs from llama.cpp on {name} rows"
