"""kernels_gpu's element-wise ops and paged attention against kernels_cpu's numpy references."""

from __future__ import annotations

import numpy as np
import pytest

# before torch: the CPU kernels' OpenMP settings must be in the environment when torch loads
import llmapp.kernels_cpu.threads  # noqa: F401, I001

torch = pytest.importorskip("torch")

from llmapp.kernels_cpu import attention as cpu_attention  # noqa: E402
from llmapp.kernels_cpu import ops as cpu_ops  # noqa: E402
from llmapp.kernels_gpu import attention, ops  # noqa: E402

RTOL, ATOL = 1e-5, 1e-5


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def test_rms_norm() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64)).astype(np.float32) * 3
    w = rng.standard_normal(64).astype(np.float32)
    got = ops.rms_norm(t(x), t(w), 1e-6).numpy()
    np.testing.assert_allclose(got, cpu_ops.rms_norm_ref(x, w, 1e-6), rtol=RTOL, atol=ATOL)
    heads = x.reshape(5, 4, 16)
    got_h = ops.rms_norm(t(heads), t(w[:16]), 1e-6).numpy()
    want_h = cpu_ops.rms_norm_ref(heads, w[:16], 1e-6)
    np.testing.assert_allclose(got_h, want_h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [32, 16])
def test_rope(neox: bool, n_rot: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 32)).astype(np.float32)
    positions = np.array([0, 1, 7, 100, 511, 4000], dtype=np.int32)
    want = cpu_ops.rope_ref(x, positions, 10000.0, n_rot, neox)
    xt = t(x.copy())
    cos, sin = ops.rope_tables(t(positions.astype(np.int64)), 10000.0, n_rot)
    ops.rope_(xt, cos, sin, neox)  # in place
    np.testing.assert_allclose(xt.numpy(), want, rtol=1e-4, atol=1e-4)


def test_gated_activations() -> None:
    rng = np.random.default_rng(2)
    gate = rng.standard_normal((4, 40)).astype(np.float32) * 4
    up = rng.standard_normal((4, 40)).astype(np.float32)
    np.testing.assert_allclose(
        ops.swiglu(t(gate), t(up)).numpy(), cpu_ops.swiglu_ref(gate, up), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        ops.gelu_tanh_mul(t(gate), t(up)).numpy(),
        cpu_ops.gelu_tanh_mul_ref(gate, up),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("cache_type", ["f16", "f32", "q8_0"])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention(window: int, cache_type: str) -> None:
    """Two sequences (a prefill of 7 rows and a decode row), GQA 4:2, shuffled blocks; the
    stored values match the CPU kernels' bit for bit (float16 rounding, q8_0 quantization)."""
    rng = np.random.default_rng(3)
    block_size, n_kv, n_head, dim = 4, 2, 4, 32
    caches = cpu_attention.alloc_kv(8, block_size, n_kv, dim, cache_type)
    tables = np.array([[5, 2, -1], [0, 7, 3]], dtype=np.int32)
    seq_lens = np.array([7, 10], dtype=np.int32)
    positions = np.array([0, 1, 2, 3, 4, 5, 6, 9], dtype=np.int32)
    starts = np.array([0, 7, 8], dtype=np.int32)
    tensors = attention.alloc_kv(8, block_size, n_kv, dim, torch.device("cpu"), cache_type)
    # every key of both sequences, written through slots (slot -1: a padding row)
    for s in range(2):
        pos = np.arange(seq_lens[s])
        slots = tables[s][pos // block_size].astype(np.int64) * block_size + pos % block_size
        slots = np.concatenate([slots, [-1]])
        k = rng.standard_normal((len(slots), n_kv, dim)).astype(np.float32)
        v = rng.standard_normal((len(slots), n_kv, dim)).astype(np.float32)
        cpu_attention.write_kv(caches[0], caches[1], k, v, slots, *caches[2:])
        attention.write_kv(tensors[0], tensors[1], t(k), t(v), t(slots), *tensors[2:])
    for got_cache, want_cache in zip(tensors, caches, strict=True):
        np.testing.assert_array_equal(got_cache.numpy(), want_cache)
    scales = dict(zip(("k_scale", "v_scale"), caches[2:], strict=False))
    q = rng.standard_normal((8, n_head, dim)).astype(np.float32)
    args = (tables, seq_lens, starts, positions, 0.35, window)
    want = cpu_attention.paged_attention_ref(q, caches[0], caches[1], *args, **scales)
    got = attention.paged_attention(
        t(q),
        tensors[0],
        tensors[1],
        tables.tolist(),
        seq_lens.tolist(),
        starts.tolist(),
        t(positions.astype(np.int64)),
        0.35,
        window,
        *tensors[2:],
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
