"""Shared pieces of the benchmarks: the standard problems, timing, machine description.

Every benchmark measures torchadjoint and its peers in the same process run, alternating,
single-threaded, and reports medians and our/their ratios.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn


class CubicOscillator(nn.Module):
    """torchdiffeq's demo problem: ``f(y) = MLP(y**3)``, MLP 2-50-2 with tanh. State (batch, 2)."""

    def __init__(self, hidden: int = 50):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y**3)


def demo_problem(seed: int = 0, batch: int = 20, n_times: int = 1000, dtype=torch.float32):
    """(func, y0 (batch, 2), t (n_times,) on [0, 25]) — the demo problem, rtol 1e-6, atol 1e-7."""
    torch.manual_seed(seed)
    func = CubicOscillator().to(dtype)
    y0 = (torch.tensor([[2.0, 0.0]]) + 0.1 * torch.randn(batch, 2)).to(dtype)
    t = torch.linspace(0.0, 25.0, n_times, dtype=dtype)
    return func, y0, t


class WideMLP(nn.Module):
    """A network-dominated field: state 32, MLP 32-128-128-32 tanh, weights N(0, 4/fan_in)."""

    def __init__(self, dim: int = 32, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=(4.0 / layer.in_features) ** 0.5)
                nn.init.zeros_(layer.bias)
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y)


def mlp_problem(seed: int = 0, batch: int = 256, dtype=torch.float32):
    """(func, y0 (batch, 32), t = [0, 1]) — single output time, rtol = atol = 1e-5."""
    torch.manual_seed(seed)
    func = WideMLP().to(dtype)
    y0 = torch.randn(batch, 32, dtype=dtype)
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    return func, y0, t


def alternate(runs: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, List[float]]:
    """Wall times (s) of each callable, run in alternation ``repeats`` times after ``warmup``."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    """One line describing where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); Python {platform.python_version()}"


def status_kib(key: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident memory of this process in KiB, from
    /proc/self/status. (Not ``ru_maxrss``: Linux carries that over from the parent across
    fork and exec, so a small child of a large parent would report the parent's size.)"""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status: the memory benchmarks need Linux")


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
