"""The paged KV cache as vLLM lays it out: per layer one key and one value tensor of blocks.

A transfer moves whole blocks, so the unit everything here is sized in is one
block of one of K/V of one layer: `block_size` tokens x `num_kv_heads` x `head_dim`.
Both ends describe their cache with a `KVLayout`; the sender's travels in the
offer, so a receiver whose cache differs is told before a byte of it is written.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument, UnsupportedBuffer


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency of the kv extra
        raise UnsupportedBuffer("sagellm_comm.kv needs torch: pip install 'sagellm-comm[torch]'") from e
    return torch


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of a paged KV cache; equal layouts can exchange blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        dt = self.dtype
        if not isinstance(dt, str):  # a torch.dtype: keep its name, so layouts compare and encode as text
            dt = str(dt).removeprefix("torch.")
            object.__setattr__(self, "dtype", dt)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidArgument(f"KVLayout.{name} must be a positive int, got {v!r}")
        torch = _torch()
        if not isinstance(getattr(torch, dt, None), torch.dtype) or not getattr(torch, dt).is_floating_point:
            raise InvalidArgument(f"KVLayout.dtype must name a floating torch dtype, got {dt!r}")

    @property
    def torch_dtype(self) -> Any:
        return getattr(_torch(), self.dtype)

    @property
    def itemsize(self) -> int:
        return int(self.torch_dtype.itemsize)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_elements(self) -> int:
        return self.block_size * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one of K/V of one layer."""
        return self.block_elements * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize

    def describe(self) -> str:
        return (f"{self.num_layers} layers x {self.num_kv_heads} kv heads x head dim {self.head_dim}, "
                f"block {self.block_size}, {self.dtype}")


class KVCache:
    """A paged KV cache: `key(l)` and `value(l)` are [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, layout: KVLayout, keys: Sequence[Any], values: Sequence[Any]) -> None:
        torch = _torch()
        if len(keys) != layout.num_layers or len(values) != layout.num_layers:
            raise InvalidArgument(f"a cache for {layout.num_layers} layers needs that many key and value "
                                  f"tensors, got {len(keys)} and {len(values)}")
        first = keys[0]
        if not isinstance(first, torch.Tensor):
            raise UnsupportedBuffer(f"KV cache tensors must be torch tensors, got {type(first).__name__}")
        self.num_blocks = int(first.shape[0]) if first.dim() else 0
        want = (self.num_blocks, *layout.block_shape)
        for kind, seq in (("key", keys), ("value", values)):
            for i, t in enumerate(seq):
                if not isinstance(t, torch.Tensor):
                    raise UnsupportedBuffer(f"{kind} tensor of layer {i} is a {type(t).__name__}, not a torch tensor")
                if tuple(t.shape) != want:
                    raise InvalidArgument(f"{kind} tensor of layer {i} has shape {tuple(t.shape)}; "
                                          f"this layout needs {want} (num_blocks, block_size, kv_heads, head_dim)")
                if t.dtype != layout.torch_dtype:
                    raise UnsupportedBuffer(f"{kind} tensor of layer {i} is {t.dtype}; the layout says "
                                            f"{layout.dtype}")
                if not t.is_contiguous():
                    raise UnsupportedBuffer(f"{kind} tensor of layer {i} is not contiguous")
                if t.device != first.device:
                    raise UnsupportedBuffer(f"{kind} tensor of layer {i} is on {t.device}, layer 0's key on "
                                            f"{first.device}: one cache lives on one device")
        self.layout = layout
        self._keys = list(keys)
        self._values = list(values)
        self.device = first.device

    @classmethod
    def allocate(cls, layout: KVLayout, num_blocks: int, device: Any = "cpu") -> KVCache:
        """A zero-filled cache of `num_blocks` blocks per layer; one allocation for all layers."""
        torch = _torch()
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise InvalidArgument(f"num_blocks must be a positive int, got {num_blocks!r}")
        whole = torch.zeros((layout.num_layers, 2, num_blocks, *layout.block_shape), dtype=layout.torch_dtype,
                            device=device)
        return cls(layout, [whole[i, 0] for i in range(layout.num_layers)],
                   [whole[i, 1] for i in range(layout.num_layers)])

    def key(self, layer: int) -> Any:
        return self._keys[layer]

    def value(self, layer: int) -> Any:
        return self._values[layer]

    @property
    def is_cuda(self) -> bool:
        return bool(self.device.type == "cuda")

    def check_blocks(self, block_ids: Sequence[int], what: str) -> list[int]:
        """`block_ids` as a list of in-range ints, or InvalidArgument naming the bad one."""
        ids = [int(i) for i in block_ids] if _is_tensor(block_ids) else list(block_ids)
        if not ids:
            raise InvalidArgument(f"{what}: no block ids given")
        if not all(type(i) is int for i in ids):  # fast path first: requests have thousands of blocks
            wrong = next(i for i in ids if type(i) is not int)
            raise InvalidArgument(f"{what}: block id {wrong!r} is not an int")
        if min(ids) < 0 or max(ids) >= self.num_blocks:
            out = next(i for i in ids if not 0 <= i < self.num_blocks)
            raise InvalidArgument(f"{what}: block id {out!r} is out of range for a cache of "
                                  f"{self.num_blocks} blocks")
        if len(set(ids)) != len(ids):
            raise InvalidArgument(f"{what}: block ids repeat ({ids[:16]}{'...' if len(ids) > 16 else ''})")
        return ids

    def __repr__(self) -> str:
        return f"<KVCache {self.layout.describe()}, {self.num_blocks} blocks on {self.device}>"


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
