"""What every benchmark shares: the machine it ran on, a timer, the floors, one table + JSON."""

import datetime
import json
import os
import platform
import statistics
import time

import torch


def machine() -> dict:
    """CPU model, cores, GPU, library versions and the date: the header of every result."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, fn()) with the GPU's queued work included."""
    sync()
    tick = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - tick, out


def median(xs):
    return statistics.median(xs)


def copy_bandwidth(megabytes: int = 256) -> float:
    """Bytes per second of a large tensor copy (read + write), the best of 5."""
    a = torch.ones(megabytes * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    return max(2 * a.numel() * 4 / timed(lambda: b.copy_(a))[0] for _ in range(5))


def matmul_rate(dtype, n: int = 2048) -> float:
    """FLOP per second of an n x n x n matmul in dtype, the best of 5."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(n, n, device=device).to(dtype)
    x @ x
    return max(2 * n**3 / timed(lambda: x @ x)[0] for _ in range(5))


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v)


def report(name: str, rows: list[dict], out: str, columns: list[str] | None = None,
           extra: dict | None = None) -> dict:
    """Print rows as a markdown table (columns, or every key of the first row) and write
    {"benchmark", "machine", "rows", ...extra} as JSON to `out`. Returns that dict."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n{name} on {machine()['cpu']}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    result = {"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwritten: {out}")
    return result
