"""torch.distributed set-up for `torchrun` launches (DDP); a no-op in a single process.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the backend is NCCL on GPUs, gloo on CPU.

Ranks that wait for one another (eval-lm's search shared across ranks) meet at
:meth:`DistContext.wait` rather than at a collective: each rank beats a counter in the
rendezvous store every second, a rank that fails posts its one-line reason there, and a
waiting rank stops with that reason, or when a rank it waits for has not beaten for
``heartbeat_timeout`` seconds (killed, its node gone), instead of hanging. SIGTERM (what
torchrun sends the others when one rank exits with an error) stops a rank the same way.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as tdist

from .guard import describe_os_error
from .util import UserError

HEARTBEAT_S = 1.0            # how often a rank beats its counter in the store
HEARTBEAT_TIMEOUT_S = 120.0  # default silence after which a waited-for rank counts as dead
FAILED = "knnlm/failed"


class RankStopped(UserError):
    """This rank stops because another one failed or went silent (the reason is its)."""


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    store: object = None              # the rendezvous store (None in one process)
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _beat: threading.Thread | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: torch.nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an update."""
        if self.enabled and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return [float(v) if isinstance(v0, float) else int(v) for v, v0 in zip(t.tolist(), values)]

    def start_heartbeat(self) -> None:
        """Beat this rank's counter every second (a daemon thread with its own store client,
        quiet once the store is gone: the run is ending)."""
        try:
            store = self.store.clone()
        except Exception:               # noqa: BLE001 - a store that cannot be cloned
            store = self.store

        def beat():
            while not self._stop.is_set():
                try:
                    store.add(f"knnlm/beat/{self.rank}", 1)
                except Exception:       # noqa: BLE001 - the store host has gone
                    return
                self._stop.wait(HEARTBEAT_S)
        self._beat = threading.Thread(target=beat, name="knnlm-heartbeat", daemon=True)
        self._beat.start()

    def failure(self) -> str | None:
        """The reason a rank posted when it failed, if one did."""
        try:
            if self.store.check([FAILED]):
                return self.store.get(FAILED).decode()
        except Exception:               # noqa: BLE001
            return None
        return None

    def fail(self, reason: str) -> None:
        """Post this rank's reason for stopping (the first posted wins) so that the other
        ranks stop with it."""
        if not self.enabled or self.store is None:
            return
        try:
            self.store.compare_set(FAILED, "", f"rank {self.rank}: {reason}")
        except Exception:               # noqa: BLE001 - nothing more to tell anyone
            pass

    @contextlib.contextmanager
    def guard(self):
        """Run a rank's work; a failure is posted for the other ranks before it propagates."""
        try:
            yield self
        except RankStopped:
            raise
        except UserError as exc:
            self.fail(str(exc))
            raise
        except OSError as exc:
            self.fail(describe_os_error(exc))
            raise
        except BaseException as exc:
            self.fail(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            raise

    def wait(self, name: str) -> None:
        """Wait until every rank has reached ``name``: stop (:class:`RankStopped`) if a rank
        posts a failure or one not yet there stops beating for ``heartbeat_timeout`` s."""
        if not self.enabled:
            return
        if self.store is None:
            tdist.barrier()
            return
        keys = [f"knnlm/at/{name}/{r}" for r in range(self.world_size)]
        self._watch(lambda: self.store.set(keys[self.rank], "1") or True)
        self._watch(lambda: self._present(keys), lambda r: not self.store.check([keys[r]]))

    def wait_key(self, key: str, rank: int) -> str:
        """The value of ``key`` once ``rank`` has set it (stopping as :meth:`wait` does if
        that rank fails or goes silent)."""
        self._watch(lambda: self._present([key]), lambda r: r == rank)
        return self._watch(lambda: self.store.get(key).decode())

    def _present(self, keys: list[str], block_s: float = 0.5) -> bool:
        """Whether ``keys`` are all set, waiting up to ``block_s`` for them (woken as soon
        as they are)."""
        try:
            self.store.wait(keys, timedelta(seconds=block_s))
            return True
        except tdist.DistStoreError:        # a timeout (a lost host: DistNetworkError)
            return False                    # not yet: look at the heartbeats, wait again

    def _watch(self, done, watched=lambda r: False):
        """Call ``done`` until it returns something true (returned): stop if a rank posts a
        failure, or if one that ``watched(rank)`` stops beating; the store's host lost is a
        stop too. Rank 0 watches every rank, the others only rank 0 (rank 0 posts what it
        finds), so the store answers O(W) heartbeat reads a second, not O(W²)."""
        seen: dict[int, tuple[int, float]] = {}
        last = 0.0
        try:
            while True:
                result = done()
                if result:
                    return result
                reason = self.failure()
                if reason is not None:
                    raise RankStopped(f"stopped: {reason}")
                now = time.monotonic()
                if now - last < HEARTBEAT_S:
                    continue
                last = now
                for r in range(self.world_size) if self.rank == 0 else (0,):
                    if r == self.rank or not watched(r):
                        continue
                    b = self.store.add(f"knnlm/beat/{r}", 0)
                    beats, since = seen.get(r, (-1, now))
                    if b != beats:
                        seen[r] = (b, now)
                    elif now - since > self.heartbeat_timeout:
                        reason = (f"rank {r} stopped responding (no heartbeat for "
                                  f"{self.heartbeat_timeout:g} s: killed, or its node is gone)")
                        self.fail(reason)
                        raise RankStopped(f"stopped: {reason}")
        except RankStopped:
            raise
        except Exception as exc:        # noqa: BLE001 - the store's host went away
            raise RankStopped(f"stopped: lost the rendezvous store at "
                              f"{os.environ.get('MASTER_ADDR', '?')}:"
                              f"{os.environ.get('MASTER_PORT', '?')} (the rank or launcher "
                              f"hosting it stopped?): {str(exc).splitlines()[0][:200]}") from None

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:      # not left inside a store call at exit
            self._beat.join(timeout=5)
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


def env_ranks() -> tuple[int, int]:
    """(rank, world size) torchrun gave this process, else (0, 1)."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _stop_on_sigterm(ctx: DistContext) -> None:
    """torchrun SIGTERMs the other ranks when one exits with an error: stop with a line
    (the failed rank's reason when it posted one) rather than die silently."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)     # a second SIGTERM kills
        reason = ctx.failure()
        raise RankStopped(f"stopped by the launcher (SIGTERM): {reason}" if reason else
                          "stopped by the launcher (SIGTERM): another rank stopped")
    signal.signal(signal.SIGTERM, stop)


def setup_distributed(cpu: bool = False, heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
                      collective_timeout: float | None = None) -> DistContext:
    """This process's rank and device (a no-op context in one process). Under torchrun:
    the process group (``collective_timeout`` s: how long a collective waits for a rank,
    default torch's), the heartbeat, and SIGTERM turned into a one-line stop."""
    rank, world = env_ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world <= 1:
        return DistContext(rank=rank, world_size=world, device=device)
    if heartbeat_timeout <= 0:
        raise UserError("--heartbeat-timeout must be > 0 seconds")
    if tdist.is_initialized():         # set up by the caller: its group, plain barriers
        return DistContext(rank=rank, world_size=world, device=device)
    # the env:// rendezvous torchrun prepares (its agent's store, or rank 0 hosting one),
    # kept: the process group and knnlm's heartbeats share it
    store, rank, world = next(tdist.rendezvous("env://", timeout=timedelta(minutes=30)))
    timeout = {} if collective_timeout is None else \
        dict(timeout=timedelta(seconds=collective_timeout))
    tdist.init_process_group(backend="nccl" if use_cuda else "gloo",
                             store=tdist.PrefixStore("default_pg", store), rank=rank,
                             world_size=world, **timeout)
    ctx = DistContext(rank=rank, world_size=world, device=device,
                      store=tdist.PrefixStore("knnlm_ranks", store),
                      heartbeat_timeout=heartbeat_timeout)
    ctx.start_heartbeat()
    _stop_on_sigterm(ctx)
    return ctx
