"""`shardquant batch --ray [ADDRESS]`: each job of a zoo as a Ray task on a cluster (shardquant/batch.py).

Ray is an optional extra (`pip install 'shardquant[ray]'`): nothing here imports it until a batch asks
for it, and nothing else in the package imports this module. A task asks for one GPU (a conversion on
`cuda`) or one CPU; Ray sets CUDA_VISIBLE_DEVICES, so inside the task the GPU is `cuda:0`. Outputs go
where the zoo's output template says, which must be a path every node shares. A task whose node is
lost is run again by Ray (`max_retries`); the conversion it restarts resumes from the output's
journal. Results and failures come back into the batch's summary; with `push`, outputs are pushed
from this process as their tasks end (shardquant/publish.py), as in the worker-process batch.
"""

from __future__ import annotations

from .batch import Job, JobResult, run_job
from .errors import ShardquantError
from .publish import Pusher

MAX_RETRIES = 2  # a task lost with its node (or its worker process) is run again this many times


def _task(job: Job, device: str, verify_mode: str) -> JobResult:
    return run_job(job, device, verify_mode)


def run_on_ray(jobs: list[Job], *, address: str | None = None, device: str = "cpu", verify_mode: str = "source",
               on_event=None, push=None) -> list[JobResult]:
    """Every job as a Ray task on the cluster at `address` (None: the one this process is attached
    to, or a local one Ray starts). on_event(kind, job, result) and `push` as in batch.run ("start"
    when the task is submitted)."""
    try:
        import ray
    except ImportError:
        raise ShardquantError("--ray needs Ray: pip install 'shardquant[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as e:  # a cluster that cannot be reached: one line
            raise ShardquantError(f"--ray {address or ''}: cannot attach to a Ray cluster ({e})".replace("  ", " ")) from None
    gpu = device.startswith("cuda")
    remote = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=MAX_RETRIES)(_task)
    place = "cuda:0" if gpu else device
    pending = {}
    for i, job in enumerate(jobs):
        pending[remote.remote(job, place, verify_mode)] = i
        if on_event:
            on_event("start", job, None)
    results: dict[int, JobResult] = {}
    pusher = Pusher(push, on_event) if push is not None else None
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                r = ray.get(ref)
            except Exception as e:  # lost after its retries, or a task that could not run
                r = JobResult(jobs[i], "failed", error=f"Ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            results[i] = r
            if on_event:
                on_event("done", jobs[i], r)
            if pusher is not None:
                pusher.submit(r)
    out = [results[i] for i in range(len(jobs))]
    if pusher is not None:
        pusher.finish(out)
    return out
