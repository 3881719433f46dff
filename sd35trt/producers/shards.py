"""Calibration over several processes with ``torch.distributed``: NCCL with one GPU per process, gloo on CPU.

ModelOpt's ``max`` calibration keeps, per quantizer, the largest |x| seen, so prompt shards calibrate
independently and merge exactly: ``mtq.quantize`` itself all-reduces every amax with MAX over the default
process group when one is initialized (``max_calibrate(distributed_sync=True)``). A shard is a fixed set of
whole pipeline calls (batch ``i`` goes to rank ``i mod N``) that keep their global seed ``seed + i``, so every
call computes exactly what it computes in one process and the merged scales are byte-identical.

Two ways in: ``sd35trt calibrate --shards N`` spawns the N workers itself (``run_workers``), or a user launches
``torchrun --nproc-per-node N -m sd35trt calibrate ...`` and each process finds its rank in the environment
(``from_environment``). Rank 0 alone does the held-out reference, the report and the writes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sd35trt.core.errors import CalibrationError, InvalidInputError, Sd35TrtError, by_name

# Rank 0 runs the held-out reference before the shards calibrate, while the others wait in a collective: at
# SD3.5-Large size that is minutes, far past NCCL's 10-minute default only on slow hosts, but a timeout
# there would kill a correct run.
GROUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Shard:
    """This process's place among the calibration workers."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owns(self, batch: int) -> bool:
        """Whether pipeline call ``batch`` (0-based, over all calibration prompts) is this shard's."""
        return batch % self.world == self.rank

    def __str__(self) -> str:
        return f"shard {self.rank + 1}/{self.world}"


SINGLE = Shard()


def from_environment() -> Shard | None:
    """The shard torchrun (or any ``env://`` launcher) gave this process, or None outside one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return Shard(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def check_shards(shards: int, batches: int, device: str, *, option: str = "--shards") -> None:
    """One line for a shard count that cannot work, before any model is built."""
    if shards < 1:
        raise InvalidInputError(f"{option} {shards} must be ≥ 1", hint="e.g. --shards 2 (one per GPU)")
    if shards > batches:
        raise InvalidInputError(f"{option} {shards} is more than the {batches} calibration batch(es) to share "
                                "(--num-prompts / --calib-batch)",
                                hint=f"use at most --shards {batches}, or a smaller --calib-batch")
    if shards > 1 and device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if shards > gpus:
            raise InvalidInputError(f"{option} {shards} needs {shards} GPUs (NCCL, one process per GPU); "
                                    f"torch sees {gpus}",
                                    hint=f"use --shards {max(gpus, 1)}, or --device cpu (gloo) for CPU workers")


@contextlib.contextmanager
def process_group(shard: Shard, device: str, init_method: str = "env://") -> Iterator[None]:
    """Join the workers' process group (NCCL on CUDA, this process on GPU ``local_rank``; gloo on CPU)."""
    import torch
    import torch.distributed as dist

    if not shard.distributed:
        yield
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(shard.local_rank)
    kwargs: dict[str, Any] = {"device_id": torch.device("cuda", shard.local_rank)} if cuda else {}
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=shard.rank,
                            world_size=shard.world, timeout=GROUP_TIMEOUT, **kwargs)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave together: a gloo rank that tore its group down and exited while rank 0 still worked aborted once in CI
    # ("terminate called without an active exception", torchrun, rank 1). Should rank 0 fail after this rank's share
    # was done, its error is the one reported: the others leave as they did before the barrier, quietly.
    try:
        dist.barrier()
    except RuntimeError:
        if shard.main:
            raise
    finally:
        dist.destroy_process_group()


def share(shard: Shard, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not shard.distributed:
        return value
    import torch.distributed as dist

    box = [value if shard.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(shard: Shard, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not shard.distributed:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * shard.world
    dist.all_gather_object(values, value)
    return values


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(target: Callable[..., Any], shard: Shard, init_method: str, errors: Any, args: tuple) -> None:
    """A spawned worker: run ``target(shard, init_method, *args)``; a user error goes back as one line."""
    import sys

    from sd35trt.core import log

    sys.stdout = sys.stderr  # workers print no results: the parent prints the report (library prints go to stderr)
    if not shard.main:
        log.console.quiet = True  # one progress display and one log: rank 0's
    try:
        target(shard, init_method, *args)
    except Sd35TrtError as err:
        errors.send((type(err).__name__, str(err)))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def run_workers(target: Callable[..., Any], shards: int, args: tuple) -> None:
    """Run ``target`` in ``shards`` spawned processes and wait for all of them.

    The first worker to fail decides the error: its own one-line error, or how it died (a signal: often the
    host's OOM killer). The others are then stopped, so no collective waits forever; rank 0 writes through
    ``atomic_dir``, so the previous calibration state is untouched by a failed run.
    """
    context = multiprocessing.get_context("spawn")
    _quiet_resource_tracker()
    pipes = [context.Pipe(duplex=False) for _ in range(shards)]  # (reader, writer): no semaphores to leak
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [context.Process(target=_worker, args=(target, Shard(rank, shards, rank), init_method, pipes[rank][1], args),
                             name=f"sd35trt-calibrate-{rank}") for rank in range(shards)]
    for proc in procs:
        proc.start()
    failed = None
    try:
        pending = list(procs)
        while pending and failed is None:
            multiprocessing.connection.wait([p.sentinel for p in pending])
            for proc in [p for p in pending if p.exitcode is not None]:
                pending.remove(proc)
                if proc.exitcode != 0 and failed is None:
                    failed = proc
    finally:
        _stop(procs)
    if failed is None:
        return
    rank = procs.index(failed)
    reader = pipes[rank][0]
    if reader.poll():
        kind, message = reader.recv()
        raise by_name(kind, CalibrationError)(f"calibration {Shard(rank, shards)}: {message}")
    if failed.exitcode == 130:
        raise KeyboardInterrupt
    code = failed.exitcode or 0
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code} (its traceback is above)"
    hint = ("the host may be out of memory (each worker holds a whole pipeline); use fewer --shards"
            if code in (-signal.SIGKILL, -signal.SIGSEGV) else "see the worker's output above")
    raise CalibrationError(f"calibration {Shard(rank, shards)} {how}; nothing was written, the previous "
                           "calibration state is intact", hint=hint)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with its leak warning off: a worker killed by a signal cannot
    unregister the semaphores torch made in it, the tracker frees them at exit and would print a warning
    after the one-line error. It takes its warning filters from ``sys.warnoptions`` when it starts."""
    import sys
    from multiprocessing import resource_tracker

    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    sys.warnoptions.append(quiet)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(quiet)


def _stop(procs: list[Any], grace: float = 20.0) -> None:
    import time

    for proc in procs:
        if proc.exitcode is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join()
