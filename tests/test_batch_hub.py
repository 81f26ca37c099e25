"""`shardquant batch` with hub sources (shardquant/batch.py _HubSources), against the local stand-in
for the hub API of tests/test_hub_local.py: sources download ahead of their jobs, each file once, and
--evict-source deletes from the hub cache exactly the files the batch downloaded, once every job of
that source succeeded."""

from __future__ import annotations

import json

import test_hub_local

from shardquant import batch

hub, tiny = test_hub_local.hub, test_hub_local.tiny  # the stand-in's fixtures (tests/test_hub_local.py)


def _zoo(tmp_path, *models: str) -> list[batch.Job]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    z = tmp_path / "zoo.toml"
    z.write_text('[defaults]\nformats = ["nvfp4", "fp8"]\noutput = "out/{name}-{format}"\n\n'
                 + "".join(f'[[model]]\nsource = "{m}"\n\n' for m in models))
    return batch.load_zoo(z)


def _cache_files(tmp_path) -> set[str]:
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() or p.is_symlink()}


def test_hub_source_downloads_once_and_is_evicted_after_its_jobs(hub, tiny, tmp_path):
    jobs = _zoo(tmp_path, "org/tiny")
    results = batch.run(jobs, device="cpu", verify_mode="source", evict_source=True)
    assert [r.status for r in results] == ["converted", "converted"], [r.error for r in results]
    assert all(r.verified and r.worst_sqnr_db > 15 for r in results)
    gets = [q["file"] for q in hub.requests() if q["method"] == "GET" and q["file"] and not q["range"]
            and q["status"] == 200]
    assert gets and len(gets) == len(set(gets))  # every file downloaded once, by the batch or by a job
    left = _cache_files(tmp_path)
    assert not [f for f in left if f.startswith("blobs/") or f.startswith("snapshots/")]  # all of it was ours
    doc = batch.summary(results)
    assert doc["counts"] == {"converted": 2, "skipped": 0, "failed": 0}


def test_eviction_keeps_what_was_in_the_cache_before_and_sources_whose_jobs_failed(hub, tiny, tmp_path):
    from huggingface_hub import hf_hub_download

    kept = hf_hub_download("org/tiny", "config.json")  # in the cache before the batch
    jobs = _zoo(tmp_path, "org/tiny")
    results = batch.run(jobs, device="cpu", verify_mode="contract", evict_source=True)
    assert [r.status for r in results] == ["converted", "converted"]
    left = _cache_files(tmp_path)
    assert any(f.endswith("/config.json") for f in left if f.startswith("snapshots/"))
    assert json.loads(open(kept).read())  # its blob is still there
    assert not any(f.endswith(".safetensors") for f in left)
    # a source one of whose jobs fails keeps its download (a rerun need not fetch it again)
    jobs = _zoo(tmp_path / "again", "org/tiny")
    bad = [jobs[0], batch.Job(jobs[1].name, jobs[1].source, jobs[1].format, jobs[1].output,
                              rules=str(tmp_path / "no-rules.toml"))]
    results = batch.run(bad, device="cpu", verify_mode="contract", evict_source=True)
    assert [r.status for r in results] == ["converted", "failed"]
    assert any(f.endswith(".safetensors") for f in _cache_files(tmp_path))
