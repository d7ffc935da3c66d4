"""What runs inside every training and alignment process, beneath the loop: the DeepSpeed config
and preparation, the process group's backend, collectives on the device that group handles, and
handing freed memory back to the OS. Nothing here knows about Ray."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from jobs.schema import JobSpec

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "jobs" / "deepspeed"


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc give every freed block of `threshold` bytes or more straight back to the OS (a
    fixed mmap threshold). By default glibc raises that threshold to the largest block freed so far
    (up to 32 MiB): from then on a training step's many 1-32 MiB activations come from the heap,
    and what the heap fragments keeps counting as resident — HLLM's peak RSS on ML-1M grew by
    0.3-0.4 GiB an epoch that way. Training and alignment call this first (in every Ray worker
    too). Returns whether it took effect (False where libc is not glibc)."""
    import ctypes
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- DeepSpeed

def deepspeed_config(spec: JobSpec, world: int, batch_size: int | None = None) -> dict:
    """The spec's DeepSpeed JSON with the global batch (`batch_size`, default train.batch_size)
    split over `world` workers and clipping from the spec; bf16 only on GPU. The optimizer and
    schedule are the loop's (AdamW, warmup + cosine), never the JSON's."""
    name = spec.train.deepspeed
    path = DEEPSPEED_DIR / f"{name}.json" if name in ("zero1", "zero2", "zero3") else Path(name)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed={name!r}: no such config ({path})")
    cfg = json.loads(path.read_text())
    micro = max(1, (batch_size or spec.train.batch_size) // world)
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=micro * world,
               gradient_clipping=spec.train.grad_clip)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    if not spec.train.use_gpu:
        cfg["bf16"] = {"enabled": False}
        cfg.pop("fp16", None)
    return cfg


def prepare_deepspeed(use_gpu: bool, max_lock_age_s: float = 300.0) -> None:
    """Call in a worker before `deepspeed.initialize`.

    Stale build locks: torch C++-extension builds (DeepSpeed's JIT ops) run under a `lock` file; a
    process killed mid-build leaves it behind and every later worker waits on it forever. A lock
    older than `max_lock_age_s` (a build takes well under a minute) is removed.

    On CPU, DeepSpeed is kept off its shared-memory communication op. Training reduces gradients
    through torch.distributed (gloo) either way; the op only serves inference all-reduce, yet
    DeepSpeed JIT-compiles it (g++, ~40 s) and initialises /dev/shm buffers in every engine, which
    needs a large /dev/shm and AVX2/AVX-512 (without them one rank faults and its peers wait on
    the shared flags forever)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("*/*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_lock_age_s:
                lock.unlink()
        except FileNotFoundError:
            pass
    if not use_gpu:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def process_group_backend(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


# ----------------------------------------------------------------------------- collectives

def collective_device(backend: str, device: torch.device) -> torch.device:
    """The device a process group's collectives take tensors on: CUDA under NCCL (it handles
    nothing else), the CPU under gloo."""
    if "nccl" in backend:
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Collectives:
    """Sums, maxima, object gathers and barriers across the worker group, each run on the device
    the process group handles (`collective_device`); a tensor comes back on the device it was
    given on. Without a process group (one process) every call is the identity."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.active else (0, 1)
        self.device = device or (collective_device(dist.get_backend(), torch.device("cpu")) if self.active
                                 else torch.device("cpu"))

    def _reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if not self.active:
            return x
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y, op=op)
        return y.to(x.device)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.SUM)

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.MAX)

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
