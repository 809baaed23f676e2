"""A tiny Llama-like decoder with a paged KV cache, for checking KV transfer end to end.

Why a model at all: a KV transfer is only right if the decode worker generates
what one process would have generated, and that is a property of real attention
over a real paged cache (rotary positions, grouped-query heads, partially filled
last blocks), not of byte equality alone. The weights are random, built from a
seed on the CPU, so every process (and every run) gets the same model without
downloading anything.

The architecture is the usual one: RMSNorm, rotary embeddings, grouped-query
attention (fewer KV heads than query heads), SwiGLU MLP. The KV cache is a
`sagellm_comm.kv.KVCache`: per layer one key and one value tensor of shape
[num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives in
block `block_ids[t // block_size]`, slot `t % block_size`.

    cfg = TinyConfig()
    model = TinyLlama(cfg, device="cpu")
    cache = KVCache.allocate(model.layout(), num_blocks=64)
    tokens = greedy(model, prompt, steps=8, cache=cache, block_ids=[5, 2, 9, 1])

Decode can also run layer by layer as a transfer lands (`decode_step_streaming`):
layer l of the first decode step only needs layer l's KV, so it can start while
later layers are still on the wire.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sagellm_comm.kv import KVCache, KVLayout


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the model; `dtype` is both the weights' and the KV cache's dtype."""

    vocab_size: int = 512
    hidden: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 704
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    block_size: int = 16
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError("rotary embeddings need an even head_dim")

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype)
        assert isinstance(dt, torch.dtype)
        return dt


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    wq: torch.Tensor  # [hidden, heads*dim]
    wk: torch.Tensor  # [hidden, kv_heads*dim]
    wv: torch.Tensor
    wo: torch.Tensor  # [heads*dim, hidden]
    mlp_norm: torch.Tensor
    w_gate: torch.Tensor  # [hidden, intermediate]
    w_up: torch.Tensor
    w_down: torch.Tensor  # [intermediate, hidden]


class TinyLlama:
    """Random-weight decoder whose prefill and decode read and write a paged `KVCache`."""

    def __init__(self, config: TinyConfig | None = None, device: Any = "cpu") -> None:
        self.config = cfg = config or TinyConfig()
        self.device = torch.device(device)
        dt = cfg.torch_dtype
        # drawn in float32 on the CPU whatever the device and dtype: the same seed gives the same model everywhere
        g = torch.Generator().manual_seed(cfg.seed)

        def mat(rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
            w = torch.randn((rows, cols), generator=g) * (scale / math.sqrt(rows))
            return w.to(device=self.device, dtype=dt)

        def norm() -> torch.Tensor:
            # not all ones, so a norm applied to the wrong tensor shows
            return (1.0 + 0.1 * torch.randn(cfg.hidden, generator=g)).to(device=self.device, dtype=dt)

        h, q, kv = cfg.hidden, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.embed = (torch.randn((cfg.vocab_size, h), generator=g)).to(device=self.device, dtype=dt)
        self.layers = [
            _Layer(attn_norm=norm(), wq=mat(h, q), wk=mat(h, kv), wv=mat(h, kv), wo=mat(q, h, 0.5),
                   mlp_norm=norm(), w_gate=mat(h, cfg.intermediate), w_up=mat(h, cfg.intermediate),
                   w_down=mat(cfg.intermediate, h, 0.5))
            for _ in range(cfg.num_layers)
        ]
        self.final_norm = norm()
        # a larger output scale makes the next-token distribution peaked, as a trained model's is,
        # so greedy choices are not coin flips decided by rounding
        self.lm_head = mat(h, cfg.vocab_size, 4.0)
        half = cfg.head_dim // 2
        self._inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))

    def layout(self) -> KVLayout:
        """The `KVLayout` of this model's KV cache."""
        c = self.config
        return KVLayout(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                        block_size=c.block_size, dtype=c.dtype)

    def allocate_cache(self, num_blocks: int) -> KVCache:
        return KVCache.allocate(self.layout(), num_blocks, device=self.device)

    # -- building blocks -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
        return (xf * w.float()).to(x.dtype)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, dim] by its positions [T] (rotate-half form, computed in float32)."""
        ang = positions.double()[:, None].cpu() * self._inv_freq[None, :]
        cos = torch.cat([ang.cos(), ang.cos()], -1).float().to(x.device)[:, None, :]
        sin = torch.cat([ang.sin(), ang.sin()], -1).float().to(x.device)[:, None, :]
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], -1)
        return (xf * cos + rotated * sin).to(x.dtype)

    def _qkv(self, layer: _Layer, x: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        hn = self._norm(x, layer.attn_norm)
        q = (hn @ layer.wq).view(-1, c.num_heads, c.head_dim)
        k = (hn @ layer.wk).view(-1, c.num_kv_heads, c.head_dim)
        v = (hn @ layer.wv).view(-1, c.num_kv_heads, c.head_dim)
        return self._rope(q, positions), self._rope(k, positions), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
        """Causal grouped-query attention of queries at first_pos.. over keys at 0..: [Tq, heads*dim].

        Scores, softmax and the weighted sum run in float32 whatever the model dtype,
        as inference kernels do.
        """
        c = self.config
        group = c.num_heads // c.num_kv_heads
        qf = q.float().transpose(0, 1)  # [heads, Tq, dim]
        kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, Tk, dim]
        vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qf @ kf.transpose(1, 2)) / math.sqrt(c.head_dim)  # [heads, Tq, Tk]
        tq, tk = q.shape[0], k.shape[0]
        qpos = torch.arange(first_pos, first_pos + tq, device=q.device)[:, None]
        kpos = torch.arange(tk, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vf  # [heads, Tq, dim]
        return out.transpose(0, 1).reshape(tq, c.num_heads * c.head_dim).to(q.dtype)

    def _finish_layer(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + attn @ layer.wo
        hn = self._norm(x, layer.mlp_norm)
        return x + (torch.nn.functional.silu(hn @ layer.w_gate) * (hn @ layer.w_up)) @ layer.w_down

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self._norm(x, self.final_norm) @ self.lm_head).float()

    def _slots(self, cache: KVCache, block_ids: Sequence[int], start: int, count: int) -> torch.Tensor:
        """Flat slot indices (block * block_size + offset) of positions start..start+count-1."""
        bs = self.config.block_size
        need = (start + count + bs - 1) // bs
        if need > len(block_ids):
            raise ValueError(f"positions up to {start + count - 1} need {need} blocks, {len(block_ids)} given")
        pos = torch.arange(start, start + count)
        ids = torch.as_tensor(list(block_ids[:need]), dtype=torch.long)
        return (ids[pos // bs] * bs + pos % bs).to(cache.device)

    def _check(self, cache: KVCache) -> None:
        if cache.layout != self.layout():
            raise ValueError(f"cache layout {cache.layout} is not this model's {self.layout()}")
        if cache.device != self.device and not (cache.device.type == self.device.type == "cuda"
                                                and self.device.index is None):
            raise ValueError(f"cache is on {cache.device}, the model on {self.device}")

    # -- full sequence, no cache: the straightforward reference ------------------------------------
    @torch.no_grad()
    def forward(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits [T, vocab] of every position, by plain causal attention without any cache."""
        x = self.embed[torch.as_tensor(list(tokens), device=self.device)]
        positions = torch.arange(len(tokens))
        for layer in self.layers:
            q, k, v = self._qkv(layer, x, positions)
            x = self._finish_layer(layer, x, self._attend(q, k, v, 0))
        return self._logits(x)

    # -- prefill --------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: Sequence[int], cache: KVCache, block_ids: Sequence[int],
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the prompt, write each position's K/V into the cache, return the last position's logits.

        on_layer(l) is called once layer l's K/V are in the cache (for a sender that
        wants to start moving a layer before the next is computed).
        """
        self._check(cache)
        n = len(tokens)
        slots = self._slots(cache, block_ids, 0, n)
        x = self.embed[torch.as_tensor(list(tokens), device=self.device)]
        positions = torch.arange(n)
        c = self.config
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, positions)
            cache.key(li).view(-1, c.num_kv_heads, c.head_dim)[slots] = k
            cache.value(li).view(-1, c.num_kv_heads, c.head_dim)[slots] = v
            if on_layer is not None:
                on_layer(li)
            x = self._finish_layer(layer, x, self._attend(q, k, v, 0))
        return self._logits(x[-1:])[0]

    # -- decode ---------------------------------------------------------------------------------
    def decode_embed(self, token: int) -> torch.Tensor:
        """The hidden state [1, hidden] a decode step starts from."""
        return self.embed[torch.as_tensor([token], device=self.device)]

    @torch.no_grad()
    def decode_layer(self, li: int, x: torch.Tensor, pos: int, cache: KVCache,
                     block_ids: Sequence[int]) -> torch.Tensor:
        """Layer li of one decode step: write the token's K/V at `pos`, attend over 0..pos from the cache."""
        c = self.config
        layer = self.layers[li]
        q, k, v = self._qkv(layer, x, torch.tensor([pos]))
        slots = self._slots(cache, block_ids, 0, pos + 1)  # gather by block id, in token order
        keys = cache.key(li).view(-1, c.num_kv_heads, c.head_dim)
        values = cache.value(li).view(-1, c.num_kv_heads, c.head_dim)
        keys[slots[-1:]] = k
        values[slots[-1:]] = v
        return self._finish_layer(layer, x, self._attend(q, keys[slots], values[slots], pos))

    @torch.no_grad()
    def decode_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)[0]

    def decode_step(self, token: int, pos: int, cache: KVCache, block_ids: Sequence[int]) -> torch.Tensor:
        """Logits [vocab] after feeding `token` at position `pos` (positions 0..pos-1 already cached)."""
        self._check(cache)
        x = self.decode_embed(token)
        for li in range(self.config.num_layers):
            x = self.decode_layer(li, x, pos, cache, block_ids)
        return self.decode_logits(x)

    async def decode_step_streaming(self, token: int, pos: int, cache: KVCache, block_ids: Sequence[int],
                                    layers: AsyncIterable[int],
                                    on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """`decode_step`, running layer l as soon as `layers` yields l (its KV has landed in the cache).

        The arithmetic is exactly decode_step's, so the logits are bit-identical to a
        step run after the whole transfer. Layers must arrive in order 0..num_layers-1:
        anything else is a broken stream and raises. on_layer(l) runs after layer l's compute.
        """
        self._check(cache)
        x = self.decode_embed(token)
        expected = 0
        async for li in layers:
            if li != expected:
                raise RuntimeError(f"layer {li} arrived where layer {expected} was due")
            x = self.decode_layer(li, x, pos, cache, block_ids)
            if on_layer is not None:
                on_layer(li)
            expected += 1
        if expected != self.config.num_layers:
            raise RuntimeError(f"the stream ended after {expected} of {self.config.num_layers} layers")
        return self.decode_logits(x)


def blocks_needed(config: TinyConfig, num_tokens: int) -> int:
    return (num_tokens + config.block_size - 1) // config.block_size


def random_prompt(config: TinyConfig, length: int, seed: int = 1) -> list[int]:
    """A reproducible prompt of `length` token ids."""
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(0, config.vocab_size, (length,), generator=g)]


def greedy(model: TinyLlama, prompt: Sequence[int], steps: int, cache: KVCache, block_ids: Sequence[int],
           logits_out: list[torch.Tensor] | None = None) -> list[int]:
    """Reference generation in one process: prefill, then `steps` greedy decode steps.

    Returns steps + 1 tokens: the first from the prefill's last logits, each next one
    from a decode step. block_ids must cover len(prompt) + steps positions.
    logits_out, if given, receives the prefill's logits and then every decode step's.
    """
    logits = model.prefill(prompt, cache, block_ids)
    if logits_out is not None:
        logits_out.append(logits)
    tokens = [int(logits.argmax())]
    for i in range(steps):
        logits = model.decode_step(tokens[-1], len(prompt) + i, cache, block_ids)
        if logits_out is not None:
            logits_out.append(logits)
        tokens.append(int(logits.argmax()))
    return tokens


def greedy_full(model: TinyLlama, prompt: Sequence[int], steps: int,
                logits_out: list[torch.Tensor] | None = None) -> list[int]:
    """`greedy` without any cache: recompute the whole sequence each step (the slow, obvious way)."""
    seq = list(prompt)
    tokens: list[int] = []
    for _ in range(steps + 1):
        logits = model.forward(seq)[-1]
        if logits_out is not None:
            logits_out.append(logits)
        tokens.append(int(logits.argmax()))
        seq.append(tokens[-1])
    return tokens


if __name__ == "__main__":
    import argparse
    import random

    ap = argparse.ArgumentParser(description="self-check: paged cache generation equals the no-cache model")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = TinyConfig(dtype=args.dtype)
    model = TinyLlama(cfg, device=args.device)
    prompt = random_prompt(cfg, args.prompt_len)
    n = blocks_needed(cfg, args.prompt_len + args.steps)
    shuffled = random.Random(0).sample(range(4 * n), n)
    a = greedy(model, prompt, args.steps, model.allocate_cache(n), list(range(n)))
    b = greedy(model, prompt, args.steps, model.allocate_cache(4 * n), shuffled)
    full = greedy_full(model, prompt, args.steps)
    print(f"contiguous blocks: {a}\nshuffled blocks:   {b}\nno cache:          {full}")
    print("OK" if a == b == full else "MISMATCH")
