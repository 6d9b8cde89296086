"""Where ``ppml encrypt``'s shards are made: in this process (``--workers 1``, decode threads), in N worker processes
(``--workers N``, :class:`concurrent.futures.ProcessPoolExecutor`, spawn) or as Ray tasks (``--engine ray``, local or
``--ray-address``). All three run the same top-level :func:`encrypt_shard` on the same task, so they write the same
bytes; the driver derives the RS permutations and hands each task only its shard's permutations — workers (and a Ray
cluster's nodes) never see the master key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

ENGINES = ("local", "ray")


def encrypt_shard(task: dict) -> dict:
    """Decodes, encrypts and writes one shard (``task``: see ``ppml.data.encrypted._shard_tasks``); spawn-safe.

    Returns ``{"k", "count", "sha256", "corrupt": [[position in the task, error]], "decode_s", "encrypt_s",
    "write_s", "cpu_s"}`` (cpu_s: the CPU time of this process spent on the shard). The shard lands at
    ``task["dst"]/shard-<k>.tar`` under a temporary name first."""
    import torch

    import ppml

    from .source import SourceItem, decode_items
    from .wds_shards import sample_members, shard_name, write_tar_atomic

    if task.get("torch_threads"):
        torch.set_num_threads(task["torch_threads"])
    cpu0 = time.process_time()  # this process's CPU seconds (all its threads): core-seconds, whatever the load
    scheme, p, g, size = task["scheme"], task["patch_size"], task["grid"], task["size"]
    items = [SourceItem(path, label, None) for path, label in zip(task["paths"], task["labels"], strict=True)]
    dev = torch.device(task.get("device") or "cpu")
    timing = {"decode_s": 0.0, "encrypt_s": 0.0, "write_s": 0.0}
    members: list[tuple[str, bytes]] = []
    corrupt: list[list] = []
    batch = task.get("batch_size", 256)
    with ThreadPoolExecutor(max_workers=max(1, task.get("threads", 1))) as pool:
        for b0 in range(0, len(items), batch):
            t0 = time.perf_counter()
            skipped: list[dict] = []
            got = decode_items(pool, task["src"], items, range(b0, min(len(items), b0 + batch)), size, skipped)
            pos = {it.path: j for j, it in enumerate(items[b0 : b0 + batch], start=b0)}
            corrupt += [[pos[s["path"]], s["error"]] for s in skipped]
            t1 = time.perf_counter()
            timing["decode_s"] += t1 - t0
            if not got:
                continue
            x = torch.stack([img for _, img in got]).to(dev)
            rows = [i for i, _ in got]
            if scheme == "rs":
                perm = torch.as_tensor(np.asarray(task["perms"])[rows].astype(np.int64)).to(dev)
                y = ppml.shuffle_patches(x, p, perm)[0].cpu().numpy()
            else:
                # the op's exact means times g² give back the integer sums exactly (sums < 2^24, float32)
                mean = ppml.mix_subpatches(x, p, g).cpu().double()
                y = (mean * (g * g)).round().to(torch.int64).numpy().astype(np.uint16)
            t2 = time.perf_counter()
            timing["encrypt_s"] += t2 - t1
            for r, i in enumerate(rows):
                members += sample_members(task["ids"][i], scheme, y[r], task["labels"][i])
            timing["write_s"] += time.perf_counter() - t2
    t0 = time.perf_counter()
    digest = write_tar_atomic(os.path.join(task["dst"], shard_name(task["k"])), members)
    timing["write_s"] += time.perf_counter() - t0
    timing["cpu_s"] = time.process_time() - cpu0
    return {"k": task["k"], "count": len(items) - len(corrupt), "sha256": digest, "corrupt": corrupt, **timing}


def _init_worker() -> None:
    # N processes on N cores: one torch thread each, or they oversubscribe the cores
    import torch

    torch.set_num_threads(1)
    # what the first shard would import anyway, imported once per worker, before any shard's clock starts
    import PIL.Image  # noqa: F401
    import torchvision.transforms.functional  # noqa: F401

    import ppml  # noqa: F401


def run_local(tasks: Iterable[dict], on_done: Callable[[dict], None]) -> None:
    for task in tasks:
        on_done(encrypt_shard(task))


def run_processes(tasks: Iterable[dict], workers: int, on_done: Callable[[dict], None]) -> None:
    """At most ``2 * workers`` shards in flight (tasks are made lazily: a large folder's permutations are never all
    in memory). Ctrl-C cancels what has not started and waits for nothing else."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # fork after torch/threads is unsafe; spawn is the portable default
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
    try:
        _bounded(tasks, lambda t: pool.submit(encrypt_shard, t), lambda f: f.result(), 2 * workers, on_done, wait)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _bounded(tasks, submit, result, limit: int, on_done, waiter) -> None:
    it: Iterator[dict] = iter(tasks)
    pending = set()
    exhausted = False
    while pending or not exhausted:
        while not exhausted and len(pending) < limit:
            task = next(it, None)
            if task is None:
                exhausted = True
            else:
                pending.add(submit(task))
        if not pending:
            break
        done, pending = waiter(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            on_done(result(fut))


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            'ppml encrypt --engine ray needs Ray, which is not installed: pip install "ppml[ray]"'
        ) from exc
    return ray


def run_ray(
    tasks: Iterable[dict], on_done: Callable[[dict], None], *, address: str | None = None, workers: int | None = None
) -> None:
    """The same :func:`encrypt_shard` as Ray tasks (one CPU each): ``ray.init()`` on this machine unless Ray is already
    initialised or ``address`` names a cluster. At most ``2 * cluster CPUs`` shards in flight."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": address} if address else ({"num_cpus": workers} if workers else {})
        ray.init(log_to_driver=False, **kwargs)
    try:
        _run_ray(ray, tasks, on_done)
    finally:
        if started:  # a Ray we started is ours to stop (a caller's own ray.init() is left running)
            ray.shutdown()


def _run_ray(ray, tasks: Iterable[dict], on_done: Callable[[dict], None]) -> None:
    remote = ray.remote(num_cpus=1)(encrypt_shard)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def waiter(pending, return_when):
        ready, rest = ray.wait(list(pending), num_returns=1)
        return set(ready), set(rest)

    refs = []
    try:
        _bounded(
            tasks,
            lambda t: refs.append(remote.remote({**t, "torch_threads": 1})) or refs[-1],
            ray.get,
            limit,
            on_done,
            waiter,
        )
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
