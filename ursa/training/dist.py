"""Many processes, one result: torch.distributed as torchrun starts it, and the few collectives ursa needs.

``torchrun --nproc-per-node N -m ursa train DATA`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous; ``Dist.from_env`` joins the process group (NCCL on GPUs, gloo on CPUs) and gives each
rank its device. Everything else stays torch's: DistributedDataParallel for fine-tuning, a
distributed sampler, and here only the plain collectives: gather a sharded tensor back into
order, average a number, agree on rank 0's decision. One process (no torchrun) is ``Dist()``: every
helper is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as torch_dist

from ursa.util.device import DeviceError, resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU); else one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend=backend)
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend)

    def shard(self, idx: Sequence[T]) -> list[T]:
        """This rank's items: every world-th one from its rank (sizes differ by at most one)."""
        return list(idx[self.rank::self.world])

    def gather_rows(self, local: torch.Tensor, n_total: int, out: torch.Tensor | None = None,
                    chunk: int = 8192) -> torch.Tensor:
        """The full tensor back from each rank's shard(): rows in the original order, into ``out`` when given.

        Gathered ``chunk`` rows of each shard at a time, so a large (memory-mapped) cache never
        needs world copies of itself in memory or on the GPU.
        """
        if not self.active:
            if out is None:
                return local
            out[:] = local
            return out
        shape = local.shape[1:]
        out = torch.empty((n_total, *shape), dtype=local.dtype) if out is None else out
        rows = -(-n_total // self.world)  # the largest shard
        dev = self._device() or torch.device("cpu")  # NCCL gathers on the GPU
        for s in range(0, rows, chunk):
            e = min(rows, s + chunk)
            pad = torch.zeros((e - s, *shape), dtype=local.dtype, device=dev)
            n_mine = max(0, min(len(local), e) - s)
            pad[:n_mine] = local[s:s + n_mine]
            parts = [torch.empty_like(pad) for _ in range(self.world)]
            torch_dist.all_gather(parts, pad)
            for r, part in enumerate(parts):
                k = max(0, min(len(range(r, n_total, self.world)), e) - s)  # rows of shard r in this chunk
                if k:  # shard r's row j is row j * world + r of the whole
                    out[s * self.world + r:(s + k - 1) * self.world + r + 1:self.world] = part[:k].to(out.device)
        return out

    def mean(self, value: float) -> float:
        """The average of a number over the ranks (the loss each rank saw)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        torch_dist.all_reduce(t)
        return float(t.item()) / self.world

    def each(self, value: float) -> list[float]:
        """Every rank's value, in rank order."""
        if not self.active:
            return [value]
        t = torch.zeros(self.world, dtype=torch.float64, device=self._device())
        t[self.rank] = value
        torch_dist.all_reduce(t)
        return t.tolist()

    def agree(self, values: Sequence[float]) -> list[float]:
        """Rank 0's numbers on every rank, so all ranks take the same decision (epochs, a budget stop)."""
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        torch_dist.broadcast(t, 0)
        return t.tolist()

    def sync_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (after each rank trained the same head)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                torch_dist.broadcast(t.data, 0)

    def _device(self) -> torch.device | None:
        """Where collectives' tensors live: the rank's GPU with NCCL, the CPU with gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None

    def barrier(self, tolerant: bool = False) -> None:
        """Wait for every rank. ``tolerant``: a rank that is gone, or a wait past the group's timeout, is let go
        (the caller has something better to say than torch's error: its own error, or a finished run)."""
        if not self.active:
            return
        try:
            torch_dist.barrier()
        except RuntimeError:  # torch's DistBackendError and gloo's timeouts are RuntimeErrors
            if not tolerant:
                raise

    def finish(self) -> None:
        """The end of a run that went well: on the CPU (gloo) every rank waits here until rank 0 has written the run
        folder, so all leave the process group together and none tears it down while another still holds it
        (PyTorch's own tests barrier before destroying a group). A write longer than the group's timeout (30 min)
        lets the others go, as before. NCCL ranks leave at once: its watchdog would abort a rank that waits
        longer than its timeout, which no ``except`` can catch."""
        if self.backend == "gloo":
            self.barrier(tolerant=True)

    def close(self) -> None:
        """Leave the process group (at the end of the run)."""
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def rank_device(spec: str, local_rank: int, world: int) -> torch.device:
    """This rank's device: --device as given, with each rank on its own GPU (cuda:LOCAL_RANK) under torchrun."""
    device = resolve_device(spec)
    if device.type == "mps" and world > 1:
        raise DeviceError("--device mps: torchrun with several processes needs CUDA (NCCL) or the CPU (gloo); "
                          "use one process on Apple's GPU, or --device cpu")
    if device.type == "cuda" and world > 1:
        if ":" in spec:
            raise DeviceError(f"--device {spec}: under torchrun each rank takes cuda:LOCAL_RANK; give --device cuda or auto")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise DeviceError(f"torchrun started {local_rank + 1}+ processes on this node but it has {n} GPU(s): "
                              f"use --nproc-per-node {n} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def env_ranks() -> tuple[int, int]:
    """(LOCAL_RANK, WORLD_SIZE) as torchrun set them (0, 1 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def describe_dist(d: Dist) -> str:
    """One line about the process group, for the first lines printed."""
    return f"distributed: {d.world} processes ({d.backend}), this is rank {d.rank}" if d.active else ""


