"""Fan episodes out over worker processes: a local spawn pool, or the actors of a Ray cluster (``backend="ray"``).

Demo generation, evaluation and preference collection hand each worker a job (an episode slot, a lockstep group of
episodes, a start state) whose result depends on the job alone, so every backend and worker count gives the same
data; the callers sort what comes back.

Ray: ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` (``ray start --head`` on one node, ``ray start
--address=HEAD:6379`` on the others), or starts a local instance with ``workers`` CPUs when there is none. Every
node needs this package installed (``pip install -e .``): the worker functions live in its modules
(``tasks.demos``, ``tasks.evaluation``, ``harness.preferences``), so Ray sends them by name, and each actor keeps
its per-process state (environments, policy) from one job to the next.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from store.errors import UsageError

BACKENDS = ("local", "ray")

Mapper = Callable[[Callable, Iterable], Iterator]  # (fn, jobs) -> results in completion order


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("backend=ray needs Ray: pip install 'tabletop-vla[ray]' (or pip install ray)") from None


@contextmanager
def worker_pool(backend: str, workers: int, initializer: Callable | None = None, initargs: tuple = (),
                inline: bool = True) -> Iterator[Mapper]:
    """Yield ``map_unordered(fn, jobs)`` over ``workers`` processes, each set up once by ``initializer(*initargs)``.

    With the local backend, ``workers == 1`` and ``inline`` the jobs run in this process.
    """
    check_backend(backend)
    if backend == "ray":
        with _ray_pool(workers, initializer, initargs) as mapper:
            yield mapper
    elif workers == 1 and inline:
        if initializer:
            initializer(*initargs)
        yield map
    else:
        with _local_pool(workers, initializer, initargs) as pool:
            yield pool.imap_unordered


@contextmanager
def _local_pool(workers: int, initializer: Callable | None, initargs: tuple) -> Iterator:
    """A spawn pool whose workers exit normally when the work is done (``close`` + ``join``) and are killed only on
    error. Killed workers skip their exit handlers, so the semaphores they made (tqdm's lock, for one, made the first
    time a worker draws a progress bar) stay registered, and Python's resource_tracker warns of "leaked semaphore
    objects" at shutdown; ``Pool.__exit__`` kills them always."""
    pool = mp.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


class _Actor:
    def __init__(self, initializer: Callable | None, initargs: tuple):
        if initializer:
            initializer(*initargs)

    def run(self, fn: Callable, job):
        return fn(job)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS``, or start a local Ray with ``num_cpus``."""
    import ray

    ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus, include_dashboard=False,
             log_to_driver=False)


@contextmanager
def _ray_pool(workers: int, initializer: Callable | None, initargs: tuple) -> Iterator[Mapper]:
    import ray
    from ray.util import ActorPool

    started = not ray.is_initialized()
    if started:
        init_ray(workers)
    actor = ray.remote(num_cpus=1)(_Actor)
    actors = [actor.remote(initializer, initargs) for _ in range(workers)]
    try:
        pool = ActorPool(actors)

        def map_unordered(fn: Callable, jobs: Iterable) -> Iterator:
            return pool.map_unordered(lambda a, job: a.run.remote(fn, job), list(jobs))

        yield map_unordered
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
