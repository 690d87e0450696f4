"""Several processes sharing one run (``accelerate launch`` on GPUs, ``torchrun`` on CPUs).

The launcher starts N copies of the same command and sets ``WORLD_SIZE``/``RANK``; accelerate joins
them into one process group (NCCL on GPUs, gloo on CPUs). The rules every shared stage follows:

- every process draws every random number the one-process run draws, from the same generators, so
  the random streams never diverge; a process then *uses* only its share (a contiguous slice of a
  batch, every N-th block of a generated set, every N-th Fisher sample);
- gradients are averaged by DDP (through ``Accelerator.prepare``), so the loss of a slice is scaled to
  make that average the one-process gradient;
- only process 0 (``Share.main``) writes outputs, checkpoints and run state; the others wait at a
  barrier and read what it wrote.

A single process (no launcher) never touches accelerate or ``torch.distributed``: ``Share()`` is a
no-op and every stage runs exactly its one-process code.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selective_amnesia.errors import AmnesiaError

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel

# A barrier may wait for process 0 to train a base model or evaluate one alone (hours at paper scale);
# a process that dies ends the others through the launcher, not through this timeout.
WAIT = datetime.timedelta(hours=24)


class _Loss(nn.Module):
    """What DDP wraps: its forward computes a loss of the model from a closure, so the model's own
    methods (``nelbo``, the EWC penalty over its parameters) run inside DDP's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[nn.Module], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        return compute(self.model)


@dataclass(frozen=True)
class Share:
    """This process's part of the run: ``rank`` of ``world`` processes (``Share()``: the only one)."""

    rank: int = 0
    world: int = 1
    accelerator: Any = None
    device: str | None = None  # the device of this process (its own GPU under accelerate launch)

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def owns(self, index: int) -> bool:
        """Whether item ``index`` of a round-robin split (blocks of a generated set) is this process's."""
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.several:
            self.accelerator.wait_for_everyone()

    def reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """``t`` summed (or averaged, ``op="mean"``) over the processes; ``t`` itself for one process."""
        if not self.several:
            return t
        from accelerate.utils import reduce

        reduced: Tensor = reduce(t.to(self.accelerator.device), reduction=op)
        return reduced.to(t.device)

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag true only if it is true in every process, so all take the same branch."""
        if not self.several:
            return list(flags)
        t = torch.tensor([float(f) for f in flags] or [1.0], dtype=torch.float64)
        return [bool(v == self.world) for v in self.reduce(t).tolist()][: len(flags)]

    def batch_slice(self, batch_size: int, setting: str) -> slice:
        """This process's contiguous slice of a global batch; equal slices, so DDP's mean of the
        per-process means is the mean over the whole batch."""
        if batch_size % self.world:
            raise AmnesiaError(
                f"{setting}={batch_size} cannot be split evenly over {self.world} processes: "
                f"make it a multiple of {self.world}"
            )
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def wrap(self, model: nn.Module, *, all_used: bool = False) -> nn.Module:
        """``model`` inside a module whose forward runs a loss closure, under DDP for several processes.

        Call the result with ``compute(model) -> tuple of tensors``: the backward of its first output
        then leaves the gradient averaged over the processes in the model's parameters. ``all_used``
        says every trainable weight reaches the loss (the EWC term touches them all), which spares DDP
        its search for unused ones every step.
        """
        wrapped = _Loss(model)
        if not self.several:
            return wrapped
        from accelerate.utils import DistributedDataParallelKwargs

        self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=not all_used)
        prepared: nn.Module = self.accelerator.prepare_model(wrapped, device_placement=False)
        return prepared

    def release(self) -> None:
        """Drop the accelerator's references to wrapped models (they keep DDP buffers alive)."""
        if self.several:
            self.accelerator.free_memory()

    @contextmanager
    def no_sync(self, wrapped: nn.Module, skip: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce in this backward (gradient accumulation) when ``skip``."""
        with self.accelerator.no_sync(wrapped) if self.several and skip else nullcontext():
            yield


_current: Share | None = None


def current_share(device: str = "cpu") -> Share:
    """This process's ``Share``: from the launcher's environment, created once per process.

    ``device`` is the resolved ``device`` setting: "cpu" joins the processes over gloo; "cuda" gives
    each process its own GPU (accelerate's local rank) over NCCL.
    """
    global _current
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Share(device=device)
    if _current is not None:
        return _current
    if device.startswith("cuda:"):
        raise AmnesiaError(
            f"device={device} would put every process on one GPU: use device=cuda under accelerate launch"
        )
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="no",  # the run's own mixed_precision setting applies, not the launcher's
        kwargs_handlers=[InitProcessGroupKwargs(timeout=WAIT)],
    )
    own = str(accelerator.device) if device != "cpu" else "cpu"
    _current = Share(accelerator.process_index, accelerator.num_processes, accelerator, own)
    return _current


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if nothing is left in it (several processes may race to do it: none fails)."""
    try:
        folder.rmdir()
    except OSError:  # not empty, or another process removed it first
        pass


def take(noise: Any, part: slice, device: torch.device | str | None = None) -> Any:
    """Rows ``part`` of a batch or its noise (a tensor, a tuple of tensors such as ``DDPMNoise``, or
    None), on ``device`` when given."""
    if noise is None:
        return None
    if isinstance(noise, Tensor):
        rows = noise[part]
        return rows if device is None else rows.to(device)
    items = [take(n, part, device) for n in noise]
    return type(noise)(*items) if hasattr(noise, "_fields") else type(noise)(items)


def split_batch(
    model: ConditionalGenerativeModel,
    part: slice,
    generator: torch.Generator,
    device: torch.device,
    batch: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    noise: tuple[Any, Any],
) -> tuple[tuple[Any, ...], tuple[Any, Any]]:
    """This process's rows of a forgetting step's whole batch ``(forget_x, forget_c, replay_x, replay_c)``
    and of its NELBO noise ``(forget, replay)``.

    A family without ``paired_noise`` draws its noise inside ``nelbo``, from the same generator, after
    the batch: it is drawn here for the whole batch in that order (forget, then replay), so the stream
    and every sample's noise stay those of the one-process run.
    """
    noise_f, noise_r = noise
    forget_x, _, replay_x, _ = batch
    if noise_f is None:
        noise_f = model.draw_noise(forget_x, generator)
        noise_r = model.draw_noise(replay_x, generator) if replay_x is not None else None
    rows = tuple(take(t, part, device) for t in batch)
    return rows, (take(noise_f, part, device), take(noise_r, part, device))
