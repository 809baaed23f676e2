"""KV-cache transfer between prefill and decode workers: paged blocks, layer by layer, per request.

    chan = kv.KVChannel(comm, cache)
    await chan.send(req, dst, my_block_ids)                 # prefill worker
    async for layer in chan.receive(req, src, my_block_ids):  # decode worker
        ...

See docs/kv.md for the protocol, the codecs and their error, and the paths
(CPU caches over any transport, CUDA caches through CUDA IPC or pinned staging).
"""

from .channel import KVChannel, LayerStream, TransferStats
from .codecs import get_codec
from .layout import KVCache, KVLayout

__all__ = ["KVCache", "KVChannel", "KVLayout", "LayerStream", "TransferStats", "get_codec"]
