"""Shared timing, memory and reporting utilities of the benchmark suite (one place).

Timing method (see BENCHMARKS.md):

* Every timed callable ends with ``torch.cuda.synchronize()`` on CUDA, so the host
  clock that pytest-benchmark reads covers the device work (``ms_host``).
* On CUDA the primary number (``ms``) is the median of per-call CUDA-event timings,
  with the L2 cache flushed (a 256 MiB write) between calls and outside the events,
  as ``triton.testing.do_bench`` does; this is what SPEC §4's anchors used.
* A CUDA-graph replay of the same work (``ms_graph``) is reported separately: it
  removes launch gaps, which dominate at these small sizes.
* On CPU the primary number is pytest-benchmark's median (``ms``).
* Warm-up is always done explicitly before timing (compilation, autotuning, handle
  creation, allocator growth stay out), whatever ``--benchmark-warmup`` says.

Nothing here asserts on speed: numbers go to ``benchmark.extra_info`` and from the
``--benchmark-json`` file into BENCHMARKS.md via ``bench/report.py``.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

WARMUP_CALLS = 3
_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffer: dict[torch.device, torch.Tensor] = {}

# Results of this session, by case key and provider: lets a case report its speedup
# over eager when eager ran first (report.py recomputes it from the JSON anyway).
RESULTS: dict[tuple, dict[str, float]] = {}


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def synced(fn, device):
    """``fn`` followed by a device synchronisation: what pytest-benchmark times."""
    if not is_cuda(device):
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def warmup(fn, device, calls: int = WARMUP_CALLS) -> None:
    for _ in range(calls):
        fn()
    sync(device)


def _flush_l2(device) -> None:
    buf = _flush_buffer.get(device)
    if buf is None:
        buf = _flush_buffer[device] = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf.zero_()


def cuda_event_median_ms(fn, device, budget_s: float = 0.5, min_reps: int = 5, max_reps: int = 1000,
                         flush: bool = True) -> float:
    """Median over calls of ``fn`` timed with CUDA events, L2 flushed before each call."""
    device = torch.device(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate_s = max(start.elapsed_time(end) / 3e3, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / estimate_s)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if flush:
            _flush_l2(device)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def cuda_graph_median_ms(fn, device, budget_s: float = 0.5, min_reps: int = 5) -> float:
    """Capture ``fn`` in a CUDA graph (after warm-up on a side stream) and time its replays."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_event_median_ms(graph.replay, device, budget_s=budget_s, min_reps=min_reps)


def host_quantile_s(fn, calls: int, quantile: float, warmup_calls: int = 1) -> float:
    """The ``quantile`` of ``calls`` calls of ``fn`` timed on the host clock, in seconds,
    after ``warmup_calls`` untimed ones (CPU work, outside pytest-benchmark)."""
    for _ in range(warmup_calls):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[int(calls * quantile)]


def host_median_ms(benchmark) -> float | None:
    """The median pytest-benchmark measured, in ms (None with --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return stats.stats.median * 1e3


def budget_s(config) -> float:
    """Time budget for the event/graph timings: follows ``--benchmark-max-time``."""
    try:
        return float(config.getoption("benchmark_max_time"))
    except (ValueError, TypeError):
        return 1.0


def min_reps(config) -> int:
    try:
        return max(1, int(config.getoption("benchmark_min_rounds")))
    except (ValueError, TypeError):
        return 5


def run_benchmark(benchmark, fn, device, config, *, graph: bool = False, warmup_calls: int = WARMUP_CALLS) -> dict:
    """Warm up, time ``fn`` with pytest-benchmark (synchronised) and, on CUDA, with
    events (and optionally as a CUDA graph). Returns the timing fields for extra_info."""
    warmup(fn, device, warmup_calls)
    benchmark(synced(fn, device))
    info = {"ms_host": host_median_ms(benchmark)}
    if is_cuda(device):
        info["ms"] = cuda_event_median_ms(fn, device, budget_s(config), min_reps(config))
        info["timing"] = "cuda-events-median-l2-flushed"
        if graph:
            try:
                info["ms_graph"] = cuda_graph_median_ms(fn, device, budget_s(config), min_reps(config))
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                info["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                torch.cuda.synchronize(device)
    else:
        info["ms"] = info["ms_host"]
        info["timing"] = "host-median"
    return info


# --- memory -------------------------------------------------------------------------


def saved_for_backward_bytes(fn, exclude: tuple = ()) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves for backward while running ``fn``
    (all, and those not belonging to the tensors in ``exclude``: inputs and parameters
    that are alive anyway)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
    total = sum(seen.values())
    extra = sum(n for p, n in seen.items() if p not in excluded)
    return total, extra


def cuda_peak_bytes(fn, device) -> int:
    """Peak device memory allocated while running ``fn``, above what was allocated before."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# --- bandwidth ------------------------------------------------------------------------


def copy_bandwidth_gbps(device, nbytes: int | None = None, reps: int = 20) -> float:
    """Measured copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus written:
    a device-to-device copy on CUDA, a memcpy (``Tensor.copy_``, current thread count)
    on CPU. Median of ``reps`` copies."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        ms = cuda_event_median_ms(lambda: dst.copy_(src), device, budget_s=0.0, min_reps=reps, flush=False)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def floor_fields(floor_bytes: int, ms: float | None, copy_gbps: float) -> dict:
    """Memory-floor metrics of one case: the floor time at the measured copy bandwidth,
    achieved GB/s (floor bytes over time), % of the floor (floor time / time) and the
    time as a multiple of the floor."""
    floor_ms = floor_bytes / (copy_gbps * 1e9) * 1e3
    info = {"floor_bytes": floor_bytes, "floor_ms": floor_ms, "copy_GBps": copy_gbps}
    if ms:
        info["achieved_GBps"] = floor_bytes / (ms * 1e-3) / 1e9
        info["pct_of_floor"] = 100.0 * floor_ms / ms
        info["x_floor"] = ms / floor_ms
    return info


def autocast_ctx(device, dtype):
    """bf16/fp16 autocast on CUDA for half dtypes; nothing for float32."""
    if dtype in (torch.bfloat16, torch.float16):
        # No cast cache: each call casts its weights (as a fresh forward does) and the
        # same callable can be captured in a CUDA graph.
        return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)
    return nullcontext()


def record(key: tuple, provider: str, ms: float | None, extra_info: dict) -> None:
    """Remember this case's time and add its speedup over eager when eager is known."""
    if ms is None:
        return
    RESULTS.setdefault(key, {})[provider] = ms
    eager = RESULTS[key].get("eager")
    if eager:
        extra_info["speedup_vs_eager"] = eager / ms
