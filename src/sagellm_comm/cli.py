"""`sagellm-comm`: the command line (demo, benchmark, environment info).

This module only parses arguments and prints; the work lives in `demo` and
`bench_allreduce`, so the same code runs from `bench/all_reduce.py` and tests.
The hidden `_worker` subcommand is how those modules start one rank in a fresh
interpreter (`python -m sagellm_comm.cli _worker KIND SPEC_JSON`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

from . import bench_output


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run and check every collective across local processes",
                       description="Start WORLD local processes that rendezvous on 127.0.0.1 (links "
                                   "over shared memory by default), "
                                   "run every collective at a small and a larger size, check each "
                                   "result against numpy on every rank; rank 0 prints a table.")
    p.add_argument("--world", type=int, default=4, help="number of processes (default 4)")
    p.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    p.add_argument("--size-kib", type=int, default=256, help="the larger size, KiB (default 256)")
    p.add_argument("--timeout", type=float, default=55.0,
                   help="seconds before every process is killed (default 55)")
    p.add_argument("--transport", choices=["auto", "tcp", "shm", "ucx"], default="auto",
                   help="auto (default): shared memory between local ranks; or force one")


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks (nccl-tests style)")
    bsub = p.add_subparsers(dest="bench", required=True,
                            metavar="{all-reduce,transports,gpu,overlap,nccl,kv,soak,cost-model}")
    a = bsub.add_parser("all-reduce", aliases=["all_reduce"],
                        help="all_reduce bandwidth and latency",
                        description="all_reduce (float32, sum) between WORLD local processes: "
                                    "median time, algbw, busbw per size; optionally gloo measured "
                                    "in the same run, in its own process set, after ours.")
    a.add_argument("--world", type=int, default=2, help="number of processes (default 2)")
    a.add_argument("--sizes", default="4,64K,1M,16M,64M",
                   help="comma-separated bytes with K/M/G suffixes (default 4,64K,1M,16M,64M)")
    a.add_argument("--iters", type=int, default=200,
                   help="timed iterations per size, at most (default 200; fewer for big sizes)")
    a.add_argument("--warmup", type=int, default=5, help="warmup iterations, at most (default 5)")
    a.add_argument("--max-seconds", type=float, default=2.0,
                   help="about this many timed seconds per size per library; 0 = always --iters")
    a.add_argument("--compare", choices=["gloo", "none"], default="none",
                   help="also measure torch.distributed gloo in the same run")
    a.add_argument("--json", metavar="FILE", help="write every result and the machine info here")
    a.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio",
                   help="event loop for our ranks (default asyncio)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    a.add_argument("--transport", choices=["auto", "tcp", "shm", "ucx"], default=None,
                   help="transport for our ranks (default: SAGELLM_COMM_TRANSPORT, else auto)")
    bench_output.add_args(a)
    t = bsub.add_parser("transports", help="tcp, shm and ucx side by side, against gloo and memcpy",
                        description="2 local processes: all_reduce latency and bus bandwidth per "
                                    "transport against gloo, and one-way point-to-point bandwidth "
                                    "against a single-core memcpy, all in the same run.")
    t.add_argument("--transports", default="",
                   help="comma-separated (default: every one available here: tcp, shm, ucx)")
    t.add_argument("--sizes", default="4,64K,1M,16M,64M", help="all_reduce sizes (default 4,64K,1M,16M,64M)")
    t.add_argument("--p2p-sizes", default="4,64K,1M,16M,64M", help="p2p sizes (default 4,64K,1M,16M,64M)")
    t.add_argument("--iters", type=int, default=200, help="timed iterations per size, at most")
    t.add_argument("--max-seconds", type=float, default=1.0, help="about this many timed seconds per size")
    t.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    t.add_argument("--no-gloo", action="store_true", help="skip the gloo comparison")
    t.add_argument("--json", metavar="FILE", help="write every result and the machine info here")
    bench_output.add_args(t)
    g = bsub.add_parser("gpu", help="CUDA completion latency, idle CPU, overhead vs NCCL, staging vs PCIe",
                        description="On a CUDA machine: how soon an awaiting task sees a kernel finish (vs a "
                                    "bare polling loop), CPU use idle and waiting, host time of an awaited "
                                    "all_reduce vs torch.distributed NCCL, and host-staged CUDA transfers "
                                    "between two processes vs pinned PCIe copies, in one run.")
    g.add_argument("--kernels-us", default="0,50,500,5000", help="kernel lengths for the latency test")
    g.add_argument("--trials", type=int, default=200, help="trials per kernel length")
    g.add_argument("--iters", type=int, default=300, help="all_reduce calls per overhead round (20 rounds)")
    g.add_argument("--staged-sizes", default="64M,256M,1G", help="sizes of the staged transfer")
    g.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    g.add_argument("--json", metavar="FILE", help="write every result and the machine info here")
    bench_output.add_args(g)
    o = bsub.add_parser("overlap", help="decode-loop overlap of compute and communication, vs sequential",
                        description="Matmuls on a compute stream and an all_reduce (or a KV offload) on the "
                                    "communication stream per step: compute alone, comm alone, sequential "
                                    "and overlapped loops in one run; prints the overlap efficiency.")
    o.add_argument("--mode", choices=["all-reduce", "offload"], default="all-reduce")
    o.add_argument("--world", type=int, default=2, help="processes for all-reduce (one GPU each if there)")
    o.add_argument("--hidden", type=int, default=8192)
    o.add_argument("--tokens", type=int, default=256, help="rows of the activation (batch x tokens)")
    o.add_argument("--matmuls", type=int, default=16, help="matrix products per step")
    o.add_argument("--comm-bytes", default="64M", help="bytes communicated per step")
    o.add_argument("--steps", type=int, default=30)
    o.add_argument("--rounds", type=int, default=3)
    o.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    o.add_argument("--json", metavar="FILE", help="write every result and the machine info here")
    bench_output.add_args(o)
    n = bsub.add_parser("nccl", help="awaited collectives on CUDA vs bare torch.distributed NCCL, 1 process/GPU",
                        description="all_reduce, all_gather, reduce_scatter on float32 CUDA tensors, one process "
                                    "per GPU: time and bus bandwidth of `await comm.<op>` against "
                                    "torch.distributed's NCCL calls in the same processes, size by size.")
    n.add_argument("--world", type=int, default=0, help="processes, one per GPU (default: every GPU)")
    n.add_argument("--sizes", default="8,64K,1M,16M,64M,256M,1G", help="total bytes per op")
    n.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter")
    n.add_argument("--iters", type=int, default=500, help="iterations per size, at most")
    n.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    n.add_argument("--json", metavar="FILE", help="write every result and the machine info here")
    bench_output.add_args(n)
    _add_bench_kv(bsub)
    _add_bench_soak(bsub)
    c = bsub.add_parser("cost-model", add_help=False,
                        help="predicted against measured time of every collective per size (see --help)")
    c.add_argument("args", nargs=argparse.REMAINDER)


def _add_bench_soak(bsub: Any) -> None:
    s = bsub.add_parser("soak", help="mixed collectives, p2p and KV transfers with random cancellations; "
                                     "nothing may grow",
                        description="WORLD processes run the same seeded random schedule for SECONDS: every "
                                    "collective on random sizes and dtypes, p2p messages and KV transfers, all "
                                    "checked, with KV transfers and p2p receives cancelled at random. Reports ops, "
                                    "errors, and RSS, open fds and shared-memory segments after the warm-up and at "
                                    "the end; exits 1 on an unexpected error, a wrong result or growth.")
    s.add_argument("--seconds", type=float, default=60.0, help="how long, warm-up included (default 60)")
    s.add_argument("--warmup", type=float, default=0.0,
                   help="seconds before the first sample (default: a fifth of --seconds, at most 10)")
    s.add_argument("--world", type=int, default=2, help="number of processes, 2-15 (default 2)")
    s.add_argument("--transport", choices=["auto", "tcp", "shm"], default="auto")
    s.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    s.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    s.add_argument("--p2p-cancel", type=float, default=0.3,
                   help="share of p2p receives cancelled after 0-3 ms and posted again (default 0.3; 0: only "
                        "KV transfers are cancelled)")
    s.add_argument("--kv-cancel", default="recv_break,recv_deadline,send_sync,send_race",
                   help="how KV transfers are cancelled, comma-separated (default all four; 'none': never): "
                        "recv_break (the receiver leaves after layer k), recv_deadline (a deadline cancels the "
                        "receiver 0-3 ms after layer k), send_sync (the sender is cancelled while the receiver "
                        "waits), send_race (the sender is cancelled while the receiver goes on)")
    s.add_argument("--rss-limit-mib", type=float, default=32.0,
                   help="allowed RSS growth after the warm-up, MiB (default 32)")
    s.add_argument("--op-timeout", type=float, default=60.0, help="seconds any one op may take (default 60)")
    s.add_argument("--json", metavar="FILE", help="write every rank's samples, counts and the verdict here")
    bench_output.add_args(s)  # a trace keeps every op in memory: the RSS check will count it


def _add_bench_kv(bsub: Any) -> None:
    k = bsub.add_parser("kv", help="KV-cache transfer prefill -> decode between 2 processes, vs the raw transport",
                        description="Rank 0 sends a request's paged KV blocks through a KVChannel, rank 1 "
                                    "receives them into its own blocks: receiver GB/s and time to the first "
                                    "layer per request size and codec, against the same bytes over the bare "
                                    "transport (one message per layer) in the same processes.")
    k.add_argument("--tokens", default="1024,4096,16384", help="request sizes in tokens (default 1024,4096,16384)")
    k.add_argument("--layers", type=int, default=32, help="layers (default 32)")
    k.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    k.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    k.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    k.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    k.add_argument("--ids", choices=["contiguous", "shuffled"], default="contiguous",
                   help="block ids: sender 0..n-1 and an offset range on the receiver (default), or random "
                        "subsets in random order on both")
    k.add_argument("--codec", action="append", default=None, metavar="none|fp8|int8",
                   help="repeatable or comma-separated (default none)")
    k.add_argument("--transport", action="append", default=None, metavar="tcp|shm|ucx",
                   help="repeatable or comma-separated (default: every one available here)")
    k.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    k.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both caches live (cuda: GPU 0 for both ranks, unless --gpus 2)")
    k.add_argument("--gpus", type=int, choices=[1, 2], default=1,
                   help="with --device cuda: 1, both ranks on the first GPU (default); 2, rank r on GPU r, "
                        "measured against a copy from GPU 0 straight into GPU 1")
    k.add_argument("--iters", type=int, default=5, help="timed transfers per size and codec (default 5)")
    k.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True,
                   help="per-block checksums on the channel (default on)")
    k.add_argument("--window", type=int, default=None, help="chunks in flight (default: the channel's)")
    k.add_argument("--chunk-bytes", default=None, help="bytes per chunk, e.g. 8M (default: the channel's)")
    k.add_argument("--ipc", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA caches: let the receiver copy through CUDA IPC (default: the channel's)")
    k.add_argument("--timeout", type=float, default=0.0,
                   help="seconds per transport before the workers are killed (default: from the bytes moved)")
    k.add_argument("--json", metavar="FILE", help="write every row, the settings and the machine info here")
    bench_output.add_args(k)


def build_parser() -> argparse.ArgumentParser:
    """The parser; `_worker` is left out of the help on purpose (it is not for people)."""
    parser = argparse.ArgumentParser(
        prog="sagellm-comm",
        description="sagellm-comm: async collectives and p2p on asyncio and trio")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{demo,bench,info,topo}")
    _add_demo(sub)
    _add_bench(sub)
    info = sub.add_parser("info", help="versions, transports and which one reaches which peer")
    info.add_argument("--world", type=int, default=0,
                      help="also start WORLD local ranks and show the transport of every link")
    info.add_argument("--transport", choices=["auto", "tcp", "shm", "ucx"], default=None,
                      help="transport setting for --world (default: SAGELLM_COMM_TRANSPORT, else auto)")
    t = sub.add_parser("topo", help="this host's topology: CPUs, NUMA, GPUs and links, NICs, RDMA, accelerators",
                       description="Discover this host (no messages): a readable tree, or JSON. --calibrate "
                                   "instead measures each link class and caches the cost model's constants for "
                                   "this host (`sagellm-comm topo --calibrate --help` for its options).")
    t.add_argument("--json", action="store_true", help="print the topology as JSON")
    t.add_argument("--calibrate", nargs=argparse.REMAINDER, default=None, metavar="...",
                   help="probe the links and cache the fit (the rest of the line goes to the probe)")
    w = sub.add_parser("_worker")
    w.add_argument("kind", choices=sorted(WORKERS))
    w.add_argument("spec", help="JSON")
    return parser


def _topo(as_json: bool, calibrate: list[str] | None) -> int:
    if calibrate is not None:
        from .topology import calibrate as probe

        return probe.main(calibrate)
    from . import topology

    found = topology.discover()
    if as_json:
        print(topology.to_json(found))
        return 0
    print(topology.format_tree(found))
    print(_cost_model_line())
    return 0


def _cost_model_line() -> str:
    """Which constants this host's collectives choose algorithms by, so a surprising choice can be traced."""
    from .topology import calibrate

    doc = calibrate.load()
    if doc is None:
        return ("cost model: built-in constants (no calibration cached for this host; "
                "`sagellm-comm topo --calibrate` measures its links)")
    links = ", ".join(sorted(doc["fit"].get("links", {})))
    return f"cost model: calibrated {doc.get('date', '?')} ({links}) from {calibrate.cache_path()}"


def _version() -> str:
    from . import __version__

    return __version__


def _info(world: int = 0, transport: str | None = None) -> int:
    from .transports import available, choice, shm

    def installed(dist: str, module: str) -> str:
        if find_spec(module) is None:
            return "not installed"
        try:
            return version(dist)
        except PackageNotFoundError:
            return "installed (version unknown)"

    print(f"sagellm-comm  {_version()}")
    print(f"python        {sys.version.split()[0]} ({platform.python_implementation()}, "
          f"{platform.system()} {platform.machine()})")
    for dist, module in (("anyio", "anyio"), ("trio", "trio"), ("msgspec", "msgspec"),
                         ("numpy", "numpy"), ("torch", "torch"), ("tqdm", "tqdm")):
        print(f"{dist:<13} {installed(dist, module)}")
    print(f"transports    {', '.join(available())}")
    ok, why = shm.shm_supported()
    print("  tcp         yes")
    print(f"  shm         {'yes (host key ' + shm.host_key() + ')' if ok else 'no: ' + why}")
    print(f"  ucx         {_ucx_status()}")
    try:
        mode = choice.setting(None)
    except Exception as e:
        mode = f"invalid ({e})"
    print(f"setting       {mode} (SAGELLM_COMM_TRANSPORT; auto = shm to peers on this host, tcp to others)")
    print(f"cpu count     {os.cpu_count()}")
    print(f"cuda          {_cuda_status()}")
    if world:
        from .demo import show_links

        return show_links(world, transport)
    return 0


def _cuda_status() -> str:
    """GPUs torch sees and whether NCCL lanes are possible (imports torch only if installed)."""
    if find_spec("torch") is None:
        return "no (torch is not installed)"
    import torch

    if not torch.cuda.is_available():
        return f"no GPU visible to torch {torch.__version__}"
    n = torch.cuda.device_count()
    nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    return (f"{n} x {torch.cuda.get_device_name(0)}; nccl {'yes' if nccl else 'no'} "
            f"(SAGELLM_COMM_BACKEND={os.environ.get('SAGELLM_COMM_BACKEND', 'auto')})")


def _ucx_status() -> str:
    if find_spec("ucxx") is None:
        return "no: ucxx is not installed (pip install 'sagellm-comm[ucx]')"
    try:
        from .transports.ucx import ucx_available
    except ImportError as e:
        return f"no: {e}"
    ok, why = ucx_available()
    return "yes (asked for with transport='ucx')" if ok else f"no: {why}"


WORKERS = {  # `_worker KIND`: the module (of this package) and function that run one rank
    "demo": ("demo", "worker"),
    "links": ("demo", "links_worker"),
    "p2p": ("bench_transports", "p2p_worker"),
    "ours": ("bench_allreduce", "ours_worker"),
    "gloo": ("bench_allreduce", "gloo_worker"),
    "gpu-overhead": ("bench_gpu", "overhead_worker"),
    "overlap": ("bench_overlap", "overlap_worker"),
    "nccl": ("bench_nccl", "nccl_worker"),
    "kv": ("bench_kv", "kv_worker"),
    "soak": ("bench_soak", "soak_worker"),
}


def _worker(kind: str, spec_json: str) -> int:
    """Run one rank of a demo or benchmark; imported lazily, so a rank loads only what it runs."""
    module, func = WORKERS[kind]
    run: Any = getattr(importlib.import_module(f".{module}", __package__), func)
    return int(run(json.loads(spec_json)))


def _bench_transports(args: Any, argv: list[str] | None) -> int:
    from . import bench_transports
    from .bench_allreduce import WorkersFailed, parse_sizes

    try:
        ar_sizes, p2p_sizes = parse_sizes(args.sizes), parse_sizes(args.p2p_sizes)
    except ValueError as e:
        print(f"sagellm-comm bench transports: {e}", file=sys.stderr)
        return 2
    names = [t.strip() for t in args.transports.split(",") if t.strip()] or bench_transports.available_transports()
    try:
        return bench_transports.run(
            transports=names, ar_sizes=ar_sizes, p2p_sizes=p2p_sizes, iters=args.iters,
            max_seconds=args.max_seconds, backend=args.backend, compare_gloo=not args.no_gloo,
            json_path=args.json, argv=["sagellm-comm", *(sys.argv[1:] if argv is None else argv)])
    except WorkersFailed as e:
        print(f"sagellm-comm bench transports FAILED: {e}", file=sys.stderr)
        return 1


def _bench_device(args: Any, argv: list[str] | None) -> int:
    from .bench_allreduce import WorkersFailed, parse_sizes

    cmd = ["sagellm-comm", *(sys.argv[1:] if argv is None else argv)]
    try:
        if args.bench == "gpu":
            from . import bench_gpu

            return bench_gpu.run(durations_us=[float(x) for x in args.kernels_us.split(",")], trials=args.trials,
                                 overhead_iters=args.iters, staged_sizes=parse_sizes(args.staged_sizes),
                                 backend=args.backend, json_path=args.json, argv=cmd)
        if args.bench == "nccl":
            from . import bench_nccl

            return bench_nccl.run(world=args.world, sizes=parse_sizes(args.sizes),
                                  ops=[o.strip() for o in args.ops.split(",") if o.strip()], iters=args.iters,
                                  backend=args.backend, json_path=args.json, argv=cmd)
        from . import bench_overlap

        return bench_overlap.run(mode=args.mode, world=args.world, hidden=args.hidden, tokens=args.tokens,
                                 matmuls=args.matmuls, comm_bytes=parse_sizes(args.comm_bytes)[0],
                                 steps=args.steps, rounds=args.rounds, backend=args.backend,
                                 json_path=args.json, argv=cmd)
    except ValueError as e:
        print(f"sagellm-comm bench {args.bench}: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"sagellm-comm bench {args.bench} needs torch with CUDA: {e}", file=sys.stderr)
        return 2
    except WorkersFailed as e:
        print(f"sagellm-comm bench {args.bench} FAILED: {e}", file=sys.stderr)
        return 1


def _split(values: list[str] | None, allowed: tuple[str, ...], default: list[str], what: str) -> list[str]:
    """Repeatable, comma-separated choices (`--codec fp8 --codec none,int8`), in order, without repeats."""
    names = [v.strip() for text in values or [] for v in text.split(",") if v.strip()] or default
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _bench_kv_settings(args: Any) -> Any:
    """The parsed `bench kv` arguments as `bench_kv.Settings`; ValueError for a bad one."""
    from . import bench_kv, bench_transports
    from .bench_allreduce import parse_sizes

    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    if not tokens or min(tokens) < 1:
        raise ValueError(f"--tokens {args.tokens!r}: give positive token counts")
    if args.iters < 1 or min(args.layers, args.kv_heads, args.head_dim, args.block_size) < 1:
        raise ValueError("--iters, --layers, --kv-heads, --head-dim and --block-size must be positive")
    if args.window is not None and args.window < 1:
        raise ValueError("--window must be positive")
    transports = _split(args.transport, ("tcp", "shm", "ucx"), [], "transport")
    return bench_kv.Settings(
        shape=bench_kv.Shape(args.layers, args.kv_heads, args.head_dim, args.block_size, args.dtype),
        tokens=tokens, codecs=_split(args.codec, bench_kv.CODECS, ["none"], "codec"),
        transports=transports or bench_transports.available_transports(), backend=args.backend,
        device=args.device, gpus=args.gpus, iters=args.iters, ids=args.ids, checksum=args.checksum, ipc=args.ipc,
        window=args.window,
        chunk_bytes=parse_sizes(args.chunk_bytes)[0] if args.chunk_bytes else None, timeout=args.timeout)


def _bench_kv(args: Any, argv: list[str] | None) -> int:
    from . import bench_kv
    from .bench_allreduce import WorkersFailed

    try:
        settings = _bench_kv_settings(args)
    except ValueError as e:
        print(f"sagellm-comm bench kv: {e}", file=sys.stderr)
        return 2
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("sagellm-comm bench kv --device cuda needs a CUDA GPU; none is visible", file=sys.stderr)
            return 2
        if settings.gpus > torch.cuda.device_count():
            print(f"sagellm-comm bench kv --gpus {settings.gpus}: torch sees {torch.cuda.device_count()} GPU(s)",
                  file=sys.stderr)
            return 2
    elif settings.gpus != 1:
        print("sagellm-comm bench kv: --gpus applies to --device cuda only", file=sys.stderr)
        return 2
    try:
        return bench_kv.run(settings, json_path=args.json,
                            argv=["sagellm-comm", *(sys.argv[1:] if argv is None else argv)])
    except WorkersFailed as e:
        print(f"sagellm-comm bench kv FAILED: {e}", file=sys.stderr)
        return 1


def _bench_soak(args: Any, argv: list[str] | None) -> int:
    from . import bench_soak
    from .bench_allreduce import WorkersFailed

    if (not 2 <= args.world <= 15 or args.seconds <= 0 or args.seed < 0 or args.warmup >= args.seconds
            or not 0 <= args.p2p_cancel <= 1):
        print("sagellm-comm bench soak: needs 2 <= --world <= 15, --seconds > 0, --seed >= 0, "
              "--warmup < --seconds and 0 <= --p2p-cancel <= 1", file=sys.stderr)
        return 2
    if find_spec("torch") is None:
        print("sagellm-comm bench soak needs torch (its KV transfers): pip install 'sagellm-comm[bench]'",
              file=sys.stderr)
        return 2
    try:
        kv_cancel = () if args.kv_cancel.strip() == "none" else tuple(
            _split([args.kv_cancel], bench_soak.KV_MODES[1:], [], "--kv-cancel mode"))
    except ValueError as e:
        print(f"sagellm-comm bench soak: {e}", file=sys.stderr)
        return 2
    settings = bench_soak.Settings(seconds=args.seconds, world=args.world, transport=args.transport,
                                   backend=args.backend, seed=args.seed, warmup=args.warmup,
                                   p2p_cancel=args.p2p_cancel, kv_cancel=kv_cancel, op_timeout=args.op_timeout,
                                   rss_limit_mib=args.rss_limit_mib)
    try:
        return bench_soak.run(settings, json_path=args.json,
                              argv=["sagellm-comm", *(sys.argv[1:] if argv is None else argv)])
    except WorkersFailed as e:
        print(f"sagellm-comm bench soak FAILED: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sagellm-comm` console script; returns the exit code."""
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:2] == ["bench", "cost-model"]:  # its own parser takes the rest, --help included
        from . import bench_cost

        return bench_cost.main(raw[2:])
    args = build_parser().parse_args(argv)
    if args.cmd == "info":
        return _info(args.world, args.transport)
    if args.cmd == "_worker":
        return _worker(args.kind, args.spec)
    if args.cmd == "topo":
        return _topo(args.json, args.calibrate)
    if args.cmd == "demo":
        from .demo import run_demo

        if args.world < 1:
            print("sagellm-comm demo: --world must be at least 1", file=sys.stderr)
            return 2
        return run_demo(args.world, args.backend, args.size_kib, args.timeout, args.transport)
    if args.cmd == "bench":
        def body(json_path: str | None) -> int:  # --json, or a scratch file when only --plot needs it
            args.json = json_path
            return _bench(args, argv)

        return bench_output.run(args.trace, args.plot, args.json, body)
    return 2


def _bench(args: Any, argv: list[str] | None) -> int:
    if args.bench == "transports":
        return _bench_transports(args, argv)
    if args.bench == "kv":
        return _bench_kv(args, argv)
    if args.bench == "soak":
        return _bench_soak(args, argv)
    if args.bench in ("gpu", "overlap", "nccl"):
        return _bench_device(args, argv)
    from . import bench_allreduce

    try:
        sizes = bench_allreduce.parse_sizes(args.sizes)
    except ValueError as e:
        print(f"sagellm-comm bench: {e}", file=sys.stderr)
        return 2
    if args.world < 2 or args.iters < 1:
        print("sagellm-comm bench: needs --world >= 2 and --iters >= 1", file=sys.stderr)
        return 2
    try:
        return bench_allreduce.run(
            world=args.world, sizes=sizes, iters=args.iters, warmup=args.warmup,
            max_seconds=args.max_seconds, backend=args.backend,
            compare=None if args.compare == "none" else args.compare, json_path=args.json,
            argv=["sagellm-comm", *(sys.argv[1:] if argv is None else argv)],
            progress=not args.no_progress, transport=args.transport)
    except bench_allreduce.WorkersFailed as e:
        print(f"sagellm-comm bench FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
