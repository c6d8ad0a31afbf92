"""Softmax attention over a paged KV cache on torch tensors.

Cache, per layer: k_cache, v_cache float32 [num_blocks, block_size, n_kv_head, head_dim] on the
layer's device; a token's slot is block_id * block_size + offset (kernels_cpu/attention.py has
the same layout). Each sequence's keys are gathered through its block table, then one
scaled-dot-product attention runs with a mask: key j is visible to a query at position p iff
j <= p and (no window, or p - j < sliding_window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alloc_kv(
    num_blocks: int, block_size: int, n_kv: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, n_kv, head_dim)
    k = torch.zeros(shape, dtype=torch.float32, device=device)
    v = torch.zeros(shape, dtype=torch.float32, device=device)
    return k, v


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store k, v [T, n_kv, D] at slot_mapping [T] (int64; negative slots are padding)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    n_kv, dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, n_kv, dim)[slots] = k[keep]
    v_cache.view(-1, n_kv, dim)[slots] = v[keep]


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
) -> torch.Tensor:
    """q [T, n_head, D] -> out [T, n_head, D]; the index lists are host-side (they size loops)."""
    n_head, dim = q.shape[1], q.shape[2]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for s, n_keys in enumerate(seq_lens):
        lo, hi = query_start_loc[s], query_start_loc[s + 1]
        if hi == lo:
            continue
        n_blocks = -(-n_keys // block_size)
        table = torch.tensor(block_tables[s][:n_blocks], dtype=torch.long, device=q.device)
        keys = k_cache[table].reshape(-1, n_kv, dim)[:n_keys]  # [n_keys, n_kv, D]
        vals = v_cache[table].reshape(-1, n_kv, dim)[:n_keys]
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
