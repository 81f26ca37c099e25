"""`shardquant batch` (shardquant/batch.py): a zoo file checked whole before anything runs, jobs in
worker processes, a failing job recorded while the others finish, a second run that skips what is
complete, a killed batch that resumes, and the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardquant import batch
from shardquant.source import scan
from shardquant.st import read_raw
from shardquant.testing import qwen3_moe, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def zoo(tmp_path):
    for i in range(3):
        write_checkpoint(tmp_path / f"m{i}", qwen3_moe(hidden=64, layers=2, experts=4, inter=32), shard_bytes=100_000,
                         seed=i)
    z = tmp_path / "zoo.toml"
    z.write_text('[defaults]\nformats = ["nvfp4", "fp8"]\noutput = "out/{name}-{format}"\n\n'
                 '[[model]]\nsource = "./m0"\n\n'
                 '[[model]]\nsource = "./m1"\nname = "second"\n\n'
                 '[[model]]\nsource = "./no-such-model"\nformats = ["nvfp4"]\n\n'
                 '[[model]]\nsource = "./m2"\nformats = ["mxfp4"]\n')
    return z


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "shardquant", "batch", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, **kw)


def test_every_problem_of_a_zoo_is_reported_at_once_with_its_line(tmp_path):
    z = tmp_path / "zoo.toml"
    z.write_text('[defaults]\n'                        # 1
                 'formats = ["nvfp4", "fp9"]\n'        # 2: unknown format
                 'expert-policy = "shared"\n'          # 3: misspelt key
                 'output = "out/{model}-{format}"\n'   # 4: unknown template field
                 '\n'
                 '[[model]]\n'                         # 6: no source
                 'name = "a"\n'
                 '\n'
                 '[[model]]\n'                         # 9
                 'source = "org/b"\n'
                 'expert_policy = "all"\n'             # 11: bad policy
                 'formats = "nvfp4"\n')                # 12: not a list
    with pytest.raises(batch.ZooError) as e:
        batch.load_zoo(z)
    lines = str(e.value).splitlines()
    assert lines[0] == f"6 problems in {z}:"
    want = [(2, "unknown format 'fp9'"), (3, "unknown key 'expert-policy' (did you mean 'expert_policy'?)"),
            (4, "output template names model"), (6, "model 1: no source"), (11, "expert_policy must be one of"),
            (12, "formats must be a list of format names")]
    for (line, text), got in zip(want, lines[1:]):
        assert got.startswith(f"{z}:{line}: ") and text in got, (line, text, got)


def test_jobs_are_models_times_formats_with_outputs_from_the_template(zoo):
    jobs = batch.load_zoo(zoo)
    assert [j.label for j in jobs] == ["m0/nvfp4", "m0/fp8", "second/nvfp4", "second/fp8", "no-such-model/nvfp4",
                                       "m2/mxfp4"]
    assert jobs[2].source == str(zoo.parent / "m1") and jobs[2].output == str(zoo.parent / "out" / "second-nvfp4")
    assert [j.line for j in jobs] == [5, 5, 8, 8, 12, 16]


def test_a_failing_job_does_not_stop_the_others_and_a_rerun_skips_what_is_complete(zoo):
    r = cli(zoo)
    assert r.returncode == 1, r.stderr
    doc = json.loads((zoo.parent / "shardquant-batch-summary.json").read_text())
    status = {(j["model"], j["format"]): j for j in doc["jobs"]}
    assert doc["counts"] == {"converted": 5, "skipped": 0, "failed": 1}
    bad = status[("no-such-model", "nvfp4")]
    assert bad["status"] == "failed" and "no such directory" in bad["error"]
    for (model, fmt), j in status.items():
        if j["status"] == "converted":
            assert j["verified"] is True and j["worst_sqnr_db"] > 15 and set(j["engines"]) == {
                "vllm", "sglang", "trtllm", "transformers"}
            assert j["source_bytes"] == scan(Path(j["source"])).total_bytes
            assert (Path(j["output"]) / "model.safetensors.index.json").exists()
    md = (zoo.parent / "shardquant-batch-summary.md").read_text()
    assert md.startswith("# shardquant batch: 5 converted, 0 already complete, 1 failed")
    stamps = {p: p.stat().st_mtime_ns for p in (zoo.parent / "out").rglob("*") if p.is_file()}
    r = cli(zoo)
    assert r.returncode == 1
    doc = json.loads((zoo.parent / "shardquant-batch-summary.json").read_text())
    assert doc["counts"] == {"converted": 0, "skipped": 5, "failed": 1}
    assert {p: p.stat().st_mtime_ns for p in (zoo.parent / "out").rglob("*") if p.is_file()} == stamps


def test_a_killed_batch_resumes_and_matches_a_clean_one(zoo, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "zoo.toml").write_text(zoo.read_text().replace("./", "../"))
    assert cli(clean / "zoo.toml").returncode == 1
    p = subprocess.Popen([sys.executable, "-m", "shardquant", "batch", str(zoo)], stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, start_new_session=True)
    deadline = time.time() + 120
    for line in p.stderr:  # the first finished job, then the whole batch (workers too) killed
        if "converted" in line:
            break
        assert time.time() < deadline
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (zoo.parent / "shardquant-batch-summary.json").exists()
    assert cli(zoo).returncode == 1
    doc = json.loads((zoo.parent / "shardquant-batch-summary.json").read_text())
    assert doc["counts"]["skipped"] >= 1 and doc["counts"]["failed"] == 1
    assert doc["counts"]["skipped"] + doc["counts"]["converted"] == 5
    for j in doc["jobs"]:
        if j["status"] != "failed":
            name = Path(j["output"]).name
            a, b = scan(Path(j["output"])).tensors, scan(clean / "out" / name).tensors
            assert a.keys() == b.keys() and all(read_raw(a[k]).tobytes() == read_raw(b[k]).tobytes() for k in a)


def test_dry_run_plans_every_job_and_writes_nothing(zoo):
    r = cli(zoo, "--dry-run")
    assert r.returncode == 1  # the missing model cannot be planned
    out = r.stdout.splitlines()
    assert len(out) == 6
    assert out[0].startswith("m0/nvfp4: modelopt flavor; quantizers ") and "nvfp4" in out[0]
    assert out[4].startswith("no-such-model/nvfp4: cannot be planned:")
    assert not (zoo.parent / "out").exists() and not (zoo.parent / "shardquant-batch-summary.json").exists()


def test_workers_share_the_jobs(zoo):
    jobs = [j for j in batch.load_zoo(zoo) if j.name != "no-such-model"]
    seen = []
    results = batch.run(jobs, device="cpu", workers=2, verify_mode="contract",
                        on_event=lambda kind, job, r: seen.append((kind, job.label)))
    assert [r.status for r in results] == ["converted"] * 5 and all(r.verified for r in results)
    assert sorted(label for kind, label in seen if kind == "done") == sorted(j.label for j in jobs)


def test_nothing_of_ray_is_imported_without_ray():
    code = ("import sys; import shardquant.cli, shardquant.batch, shardquant.convert, shardquant.verify; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_zoo_on_a_local_ray_instance_gives_the_same_bytes(zoo, tmp_path):
    """The same jobs as Ray tasks (a local Ray with 2 CPUs): every output byte-identical to the
    worker-process batch, results in the same summary shape."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra shardquant[ray]; the test extra installs it")
    from shardquant.ray_jobs import run_on_ray

    jobs = [j for j in batch.load_zoo(zoo) if j.name != "no-such-model"]
    local = batch.run(jobs, device="cpu", verify_mode="contract")
    moved = [batch.Job(j.name, j.source, j.format, str(tmp_path / "ray" / Path(j.output).name), j.revision, j.flavor,
                       j.expert_policy, j.rules, j.line) for j in jobs]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_on_ray(moved + [batch.Job("gone", str(tmp_path / "gone"), "nvfp4", str(tmp_path / "ray" / "x"))],
                            device="cpu", verify_mode="contract")
    finally:
        ray.shutdown()
    assert [r.status for r in remote] == ["converted"] * len(jobs) + ["failed"]
    assert "no such directory" in remote[-1].error
    assert batch.summary(remote)["counts"] == {"converted": len(jobs), "skipped": 0, "failed": 1}
    for a, b in zip(local, remote):
        x, y = scan(Path(a.job.output)).tensors, scan(Path(b.job.output)).tensors
        assert x.keys() == y.keys() and all(read_raw(x[k]).tobytes() == read_raw(y[k]).tobytes() for k in x)
        assert {p.name for p in Path(a.job.output).iterdir()} == {p.name for p in Path(b.job.output).iterdir()}


def test_zoo_keys_reach_the_conversion_and_the_summary(zoo):
    """scale_search and mx_source are zoo keys: a job with searched scales reports its mean SQNR gain
    over round to nearest in the summary; a bad value is a zoo problem with its line."""
    z = zoo.parent / "search.toml"
    z.write_text('[defaults]\nformats = ["nvfp4"]\noutput = "s/{name}"\nscale_search = "mse"\n\n'
                 '[[model]]\nsource = "./m0"\nmx_source = "requantize"\n')
    jobs = batch.load_zoo(z)
    assert (jobs[0].scale_search, jobs[0].mx_source) == ("mse", "requantize")
    (r,) = batch.run(jobs, device="cpu", verify_mode="source")
    assert r.status == "converted" and r.rtn_gain_db is not None and r.rtn_gain_db > 0.3
    assert batch.summary([r])["jobs"][0]["rtn_gain_db"] == round(r.rtn_gain_db, 3)
    z.write_text('[defaults]\nformats = ["nvfp4"]\n\n[[model]]\nsource = "./m0"\nscale_search = "best"\n')
    with pytest.raises(batch.ZooError, match=r"search.toml:6: model 1: scale_search must be one of none, mse"):
        batch.load_zoo(z)


def test_workers_are_per_device_with_devices():
    assert batch.worker_places("auto", ["cuda:0", "cuda:1"], 2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert batch.worker_places("auto", ["cuda:3"], 1) == ["cuda:3"]
    assert batch.worker_places("cpu", None, 3) == ["cpu"] * 3
    assert batch.worker_places("cpu", None, 0) == ["cpu"]


# ---------------------------------------------------------------------------------------------
# Outputs in an object store (fsspec URIs; file:// stands in for s3:// and the like)


def _files(d: Path) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_outputs_at_a_uri_are_converted_locally_verified_and_stored(zoo, tmp_path):
    from shardquant.verify import verify

    store = tmp_path / "store"
    z = tmp_path / "zoo-remote.toml"
    z.write_text(f'[defaults]\nformats = ["nvfp4"]\noutput = "file://{store}/{{name}}-{{format}}"\n'
                 f'staging = "stage"\n\n[[model]]\nsource = "./m0"\n\n[[model]]\nsource = "./m1"\n')
    jobs = batch.load_zoo(z)
    assert [j.output for j in jobs] == [f"file://{store}/m0-nvfp4", f"file://{store}/m1-nvfp4"]
    assert all(j.remote and Path(j.stage).parent == tmp_path / "stage" for j in jobs)
    res = batch.run(jobs, device="cpu", verify_mode="source")
    assert [r.status for r in res] == ["converted", "converted"], [r.error for r in res]
    assert all(r.verified for r in res)
    local = tmp_path / "local"
    for j in jobs:
        stored = store / Path(j.output).name
        assert verify(stored).ok  # the stored output is complete and whole
        from shardquant.convert import convert

        convert(j.source, local / stored.name, "nvfp4", device="cpu")
        assert _files(stored) == _files(local / stored.name)  # the bytes of a local conversion
    assert not any((tmp_path / "stage").iterdir())  # each stage deleted once stored
    again = batch.run(jobs, device="cpu", verify_mode="source")
    assert [r.status for r in again] == ["skipped", "skipped"]


def test_an_interrupted_upload_never_looks_complete_and_a_rerun_finishes_it(zoo, tmp_path, monkeypatch):
    import fsspec.implementations.local as local_fs

    from shardquant.manifest import MANIFEST_NAME
    from shardquant.verify import verify

    store = tmp_path / "store"
    z = tmp_path / "zoo-remote.toml"
    z.write_text(f'[defaults]\nformats = ["fp8"]\noutput = "file://{store}/{{name}}"\n\n[[model]]\nsource = "./m0"\n')
    (job,) = batch.load_zoo(z)
    real, calls = local_fs.LocalFileSystem.put_file, []

    def failing(self, lpath, rpath, *a, **kw):
        calls.append(rpath)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(local_fs.LocalFileSystem, "put_file", failing)
    r = batch.run_job(job, "cpu", "contract")
    assert r.status == "failed" and r.error.startswith(f"upload to {job.output}: OSError") and "No space" in r.error
    assert not (store / "m0" / MANIFEST_NAME).exists() and not batch.stored_complete(job.output)
    assert Path(job.stage, MANIFEST_NAME).exists()  # the verified stage is kept for the rerun
    monkeypatch.setattr(local_fs.LocalFileSystem, "put_file", real)
    r = batch.run_job(job, "cpu", "contract")
    assert r.status == "converted" and r.error is None
    assert verify(store / "m0").ok and not Path(job.stage).exists()


def test_an_output_uri_without_a_filesystem_is_a_zoo_problem(zoo, tmp_path):
    z = tmp_path / "zoo-bad.toml"
    z.write_text('[defaults]\nformats = ["fp8"]\n\n[[model]]\nsource = "./m0"\noutput = "nosuch://bucket/{name}"\n\n'
                 '[[model]]\nsource = "./m1"\noutput = "file:///tmp/{name}"\n')
    with pytest.raises(batch.ZooError) as e:
        batch.load_zoo(z)
    (line,) = str(e.value).splitlines()[1:]
    assert line.startswith(f"{z}:6: model 1 (m0, fp8): output 'nosuch://bucket/m0': no filesystem for nosuch://")
    push = tmp_path / "zoo-push.toml"
    push.write_text('[defaults]\nformats = ["fp8"]\noutput = "file:///tmp/x/{name}"\n\n[[model]]\nsource = "./m0"\n')
    with pytest.raises(batch.ZooError, match="not pushed to the hub as well"):
        batch.load_zoo(push, push_to="org")


def test_workers_sharing_a_gpu_divide_its_memory():
    """Two workers on one GPU start together and would each plan on its whole free memory: each gets its
    share (shardquant/batch.py shared_gpu_memory); one worker, or the CPU, keeps the default."""
    whole = {"cuda:0": 100 * 2**30, "cpu": None}
    assert batch.shared_gpu_memory("cuda:0", 2, whole.get) == 50 * 2**30
    assert batch.shared_gpu_memory("cuda:0", 3, whole.get) == 100 * 2**30 // 3
    assert batch.shared_gpu_memory("cuda:0", 1, whole.get) is None
    assert batch.shared_gpu_memory("cpu", 2, whole.get) is None
    assert batch.shared_gpu_memory("cpu", 2) is None  # the real backend: the CPU has no device budget
