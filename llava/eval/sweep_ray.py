"""A sweep's jobs on a Ray cluster: ``python -m llava.eval.sweep ... --ray auto [--num-chunks 8]``.

The workers are Ray actors of :class:`llava.eval.sweep.SweepWorker`. Each holds ``--ray-gpus-per-worker`` GPUs
(default 1 on a cluster with GPUs) and ``--ray-cpus-per-worker`` CPUs, loads the base model once, and answers
every job it is handed: one job per (method, budget, benchmark, chunk), dealt to whichever worker is free.
Jobs are ordered by (benchmark, chunk), so a worker tends to see the same images under several methods and
its vision cache saves their tower passes.

Resume is per job. Jobs whose answers are complete are not sent at all. A killed worker is restarted (at
most ``--ray-max-retries`` times) and Ray retries its job on it, which resumes from the answer lines already
written (the generators' per-line resume: a truncated last line is redone, nothing is answered twice). The
driver then merges the chunks and scores, exactly as a serial sweep does, into the same
results.csv/json, table.md and plot.

Every node needs this package installed and must see the model, LPM, ``--eval-root`` and ``--out`` at the same
paths (a shared filesystem). Ray itself is the optional ``ray`` extra (``EXTRAS=...,ray bash
scripts/setup_env.sh``); it does not depend on torch. docs/evaluation.md, "Running a sweep on a cluster".
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from .sweep import Job, SweepWorker, pending_jobs


class SweepClusterError(RuntimeError):
    """A worker died more often than ``--ray-max-retries``; the answers written so far are kept."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray, the optional 'ray' extra: EXTRAS=train,demo,eval,test,lmms,video,ray "
                         "bash scripts/setup_env.sh (or pip install 'ray==2.60.0')") from None  # fmt: skip
    return ray


def connect(address: str):
    """Join the cluster at ``address`` ("auto": the running one; "local": start one here) unless Ray is up."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False)
        except ConnectionError as err:
            raise ValueError(f"--ray {address}: no Ray cluster found ({err}); start one with `ray start --head`, "
                             "or pass --ray local to start one on this machine") from None  # fmt: skip
    return ray


def worker_shape(args: argparse.Namespace, resources: dict, jobs: int) -> tuple[int, float, int]:
    """(CPUs, GPUs, number) of the workers: as many as the cluster holds, at most one per job."""
    if args.ray_cpus_per_worker < 1:
        raise ValueError(f"--ray-cpus-per-worker must be >= 1, got {args.ray_cpus_per_worker}")
    cpus, gpus = args.ray_cpus_per_worker, args.ray_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    fits = int(resources.get("GPU", 0) // gpus) if gpus > 0 else int(resources.get("CPU", 0) // cpus)
    if fits < 1:
        raise ValueError(f"the Ray cluster ({resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} GPUs) cannot "
                         f"hold one worker of {cpus} CPU(s) and {gpus} GPU(s); lower --ray-cpus-per-worker / "
                         "--ray-gpus-per-worker")  # fmt: skip
    count = args.ray_workers if args.ray_workers is not None else fits
    if count < 1:
        raise ValueError(f"--ray-workers must be >= 1, got {count}")
    return cpus, gpus, max(1, min(count, jobs))


def run_on_ray(args: argparse.Namespace, combos: list[tuple], jobs: list[Job]) -> tuple[dict, list[dict], dict]:
    """The pending jobs on Ray workers -> (plan summary per (method, budget), job records, model info)."""
    ray = connect(args.ray)
    from ray.util import ActorPool

    todo = sorted(pending_jobs(args, jobs), key=lambda j: (j.bench, j.chunk, combos.index((j.method, j.budget))))
    cpus, gpus, count = worker_shape(args, ray.cluster_resources(), len(todo))
    worker_args = argparse.Namespace(**{**vars(args), "no_progress": True})  # one progress bar: the driver's
    actor = ray.remote(SweepWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=args.ray_max_retries,
                                            max_task_retries=args.ray_max_retries)  # fmt: skip
    workers = [actor.remote(worker_args, threads=cpus) for _ in range(count)]
    print(f"[sweep] {len(todo)} of {len(jobs)} jobs to run on {count} Ray worker(s) ({cpus} CPU, {gpus:g} GPU each)",
          file=sys.stderr)  # fmt: skip
    plans, records = {}, []
    try:
        bar = tqdm(total=len(todo), desc="jobs", unit="job", disable=args.no_progress, file=sys.stderr)
        for record in ActorPool(workers).map_unordered(lambda w, job: w.run.remote(job), todo):
            plans[(record["method"], record["budget"])] = record["plan"]
            records.append(record)
            bar.update(1)
        bar.close()
        for combo in (c for c in combos if c not in plans):  # finished (or never sent): only its plan is needed
            plans[combo] = ray.get(workers[0].attach.remote(*combo))
        info = ray.get(workers[0].describe.remote())
    except ray.exceptions.RayTaskError as err:  # an input error inside a job: the job's own message
        raise err.cause if isinstance(err.cause, (ValueError, FileNotFoundError)) else err
    except ray.exceptions.RayActorError as err:
        raise SweepClusterError(f"a Ray worker died more than --ray-max-retries={args.ray_max_retries} times ({err}); "
                                "the answers written so far are kept: re-run the same command to resume") from None
    finally:
        for w in workers:
            ray.kill(w)
    return plans, records, info
