"""Counters in the Prometheus text exposition format, for a metrics system to scrape.

Why text and no server: the runtime lives inside someone else's process (an
inference server) which already has an HTTP endpoint, or a `prometheus_client`
registry; a string it can append to its own page, or a custom collector can
re-read, fits either without adding a dependency or a port (docs/observability.md).

Every counter only grows (calls, errors, bytes, seconds per op and algorithm),
so a scraper can take rates; the values are those of `Stats`, summed over the
communicators given (each one's rank and group become labels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .stats import OpCounter, Stats

_OPS = (  # name, OpCounter field, help
    ("sagellm_comm_ops_total", "calls", "Ops finished (ok or failed), per op and algorithm."),
    ("sagellm_comm_op_errors_total", "errors", "Ops that failed, per op and algorithm."),
    ("sagellm_comm_op_bytes_total", "bytes", "Bytes of the ops' inputs, per op and algorithm."),
    ("sagellm_comm_op_seconds_total", "seconds", "Seconds spent running ops on this rank, per op and algorithm."),
)
_KV = (  # name, counter keys (direction label -> key), help
    ("sagellm_comm_kv_transfers_total", {"sent": "transfers_sent", "received": "transfers_received"},
     "KV-cache transfers finished, per channel and direction."),
    ("sagellm_comm_kv_chunks_total", {"sent": "chunks_sent", "received": "chunks_received"},
     "KV-cache chunks moved, per channel and direction."),
    ("sagellm_comm_kv_bytes_total", {"sent": "bytes_sent", "received": "bytes_received"},
     "KV-cache wire bytes moved, per channel and direction."),
    ("sagellm_comm_kv_failed_total", {"": "failed"}, "KV-cache transfers that failed, per channel."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}" if pairs else ""


def _number(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return "NaN" if math.isnan(v) else repr(float(v))


def prometheus_text(stats: Iterable[Stats] | None = None, *, kv: Iterable[Any] = (),
                    labels: dict[str, str] | None = None) -> str:
    """The counters of `stats` (default: every live communicator of the process) and of KV channels `kv`.

    `labels` (e.g. {"job": "decode"}) go on every sample besides rank, group, op and algorithm.
    """
    extra = dict(labels or {})
    # communicators of one rank and group (a world made again after the last one closed) add up:
    # one series per label set, as the format requires
    totals: dict[tuple[int, str, str, str], OpCounter] = {}
    for st in list(Stats.live) if stats is None else stats:
        for (op, algo), c in list(st.by_algorithm.items()):
            t = totals.setdefault((st.rank, st.group, op, algo), OpCounter())
            t.calls += c.calls
            t.errors += c.errors
            t.bytes += c.bytes
            t.seconds += c.seconds
    lines: list[str] = []
    for name, attr, text in _OPS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        for (rank, group, op, algo), c in sorted(totals.items()):
            lab = {**extra, "rank": str(rank), "group": group, "op": op, "algorithm": algo}
            lines.append(f"{name}{_labels(lab)} {_number(getattr(c, attr))}")
    channels = list(kv)
    if channels:
        for name, keys, text in _KV:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            for ch in channels:
                comm = ch.comm
                base = {**extra, "rank": str(comm.global_ranks[comm.rank]), "group": comm.group_id,
                        "channel": str(ch.name)}
                for direction, key in keys.items():
                    lab = {**base, "direction": direction} if direction else base
                    lines.append(f"{name}{_labels(lab)} {_number(ch.counters[key])}")
    return "\n".join(lines) + "\n"
