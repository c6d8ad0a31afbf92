"""Softmax attention over a paged KV cache on torch tensors.

Cache, per layer: k_cache, v_cache [num_blocks, block_size, n_kv_head, head_dim] on the layer's
device, in one of three cache types (kernels_cpu/attention.py has the same layout and types):
float16 (f16, the default), float32 (f32), or int8 with float16 scales k_scale, v_scale
[num_blocks, block_size, n_kv_head, head_dim // 32], one per 32 values (q8_0). A token's slot
is block_id * block_size + offset. Each sequence's keys are gathered through its block table
and widened (q8_0: dequantized) to the queries' dtype, then one scaled-dot-product attention
runs with a mask: key j is visible to a query at position p iff j <= p and (no window, or
p - j < sliding_window).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CACHE_TYPES = ("f16", "f32", "q8_0")
Q8_BLOCK = 32
_STORAGE = {"f16": torch.float16, "f32": torch.float32, "q8_0": torch.int8}


def alloc_kv(
    num_blocks: int,
    block_size: int,
    n_kv: int,
    head_dim: int,
    device: torch.device,
    cache_type: str = "f16",
) -> tuple[torch.Tensor, ...]:
    """Zeroed K and V blocks: (k_cache, v_cache), and for q8_0 (k, v, k_scale, v_scale)."""
    if cache_type not in _STORAGE:
        raise ValueError(f"unknown KV cache type {cache_type!r} ({', '.join(CACHE_TYPES)})")
    if cache_type == "q8_0" and head_dim % Q8_BLOCK:
        raise ValueError(f"a q8_0 KV cache needs head_dim a multiple of 32, not {head_dim}")
    shape = (num_blocks, block_size, n_kv, head_dim)
    dtype = _STORAGE[cache_type]
    tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
    if cache_type == "q8_0":
        scales = shape[:3] + (head_dim // Q8_BLOCK,)
        tensors += [torch.zeros(scales, dtype=torch.float16, device=device) for _ in range(2)]
    return tuple(tensors)


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float16 scales [..., D // 32]): scale = max|x| / 127 per
    32 values, each value x / scale rounded half away from zero (ggml's Q8_0)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, Q8_BLOCK)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    r = (blocks * inv).double()  # exact, so adding 0.5 rounds only once
    qs = torch.trunc(r + torch.copysign(torch.full_like(r, 0.5), r)).to(torch.int8)
    return qs.reshape(x.shape), step[..., 0].to(torch.float16)


def dequantize_q8_0(qs: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    blocks = qs.reshape(*qs.shape[:-1], -1, Q8_BLOCK).to(dtype)
    return (blocks * scales.to(dtype)[..., None]).reshape(qs.shape)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store k, v [T, n_kv, D] at slot_mapping [T] (int64; negative slots are padding),
    converted to the cache's type (q8_0: quantized, scales into k_scale, v_scale)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    n_kv, dim = k_cache.shape[2], k_cache.shape[3]
    pairs = [(k_cache, k_scale, k[keep]), (v_cache, v_scale, v[keep])]
    for cache, scale, rows in pairs:
        if cache.dtype == torch.int8:
            if scale is None:
                raise ValueError("a q8_0 KV cache needs its k_scale and v_scale")
            qs, d = quantize_q8_0(rows)
            cache.view(-1, n_kv, dim)[slots] = qs
            scale.view(-1, n_kv, scale.shape[3])[slots] = d
        else:
            cache.view(-1, n_kv, dim)[slots] = rows.to(cache.dtype)


def _gather(
    cache: torch.Tensor, scale: torch.Tensor | None, table: torch.Tensor, n_keys: int, dtype: Any
) -> torch.Tensor:
    """A sequence's stored keys (or values) [n_keys, n_kv, D] in `dtype`."""
    n_kv, dim = cache.shape[2], cache.shape[3]
    rows = cache[table].reshape(-1, n_kv, dim)[:n_keys]
    if cache.dtype != torch.int8:
        return rows.to(dtype)
    assert scale is not None
    scales = scale[table].reshape(-1, n_kv, scale.shape[3])[:n_keys]
    return dequantize_q8_0(rows, scales, dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: list[list[int]],
    seq_lens: list[int],
    query_start_loc: list[int],
    positions: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, n_head, D] -> out [T, n_head, D]; the index lists are host-side (they size loops)."""
    n_head = q.shape[1]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for s, n_keys in enumerate(seq_lens):
        lo, hi = query_start_loc[s], query_start_loc[s + 1]
        if hi == lo:
            continue
        n_blocks = -(-n_keys // block_size)
        table = torch.tensor(block_tables[s][:n_blocks], dtype=torch.long, device=q.device)
        keys = _gather(k_cache, k_scale, table, n_keys, q.dtype)  # [n_keys, n_kv, D]
        vals = _gather(v_cache, v_scale, table, n_keys, q.dtype)
        j = torch.arange(n_keys, device=q.device)
        pos = positions[lo:hi, None]
        visible = j[None, :] <= pos  # [n_q, n_keys]
        if sliding_window > 0:
            visible &= pos - j[None, :] < sliding_window
        group = n_head // n_kv
        # GQA: each kv head serves `group` consecutive query heads
        k_h = keys.permute(1, 0, 2).repeat_interleave(group, dim=0)  # [n_head, n_keys, D]
        v_h = vals.permute(1, 0, 2).repeat_interleave(group, dim=0)
        q_h = q[lo:hi].permute(1, 0, 2)  # [n_head, n_q, D]
        o = F.scaled_dot_product_attention(q_h, k_h, v_h, attn_mask=visible, scale=scale)
        out[lo:hi] = o.permute(1, 0, 2)
    return out
