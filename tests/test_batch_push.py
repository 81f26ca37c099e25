"""`shardquant batch --push-to ORG` (shardquant/publish.py, shardquant/hub.py push_folder) against the
local stand-in for the hub of tests/test_hub_local.py, which records every create / preupload / commit
call: only finished, verified outputs are pushed; the pushed repo, downloaded again, passes verify
while the output keeps its own bytes; the card pushed carries the verify results; a failed push is
the job's error and a later batch finishes it without pushing again what is complete; both upload
methods (huggingface_hub 2.x upload_folder, 1.x upload_large_folder) reach the same repo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import test_hub_local
from click.testing import CliRunner
from huggingface_hub import HfApi, snapshot_download

from shardquant import batch, hub as hubmod, publish
from shardquant.cli import main
from shardquant.manifest import MANIFEST_NAME
from shardquant.testing import qwen3_moe, write_checkpoint
from shardquant.verify import verify

hub, tiny = test_hub_local.hub, test_hub_local.tiny  # the stand-in's fixtures (tests/test_hub_local.py)
TOKEN = test_hub_local.TOKEN


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _zoo(where: Path, *models: str, formats: str = '["nvfp4", "fp8"]', defaults: str = "") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    z = where / "zoo.toml"
    z.write_text(f'[defaults]\nformats = {formats}\noutput = "out/{{name}}-{{format}}"\n{defaults}\n'
                 + "".join(f'[[model]]\nsource = "{m}"\n\n' for m in models))
    return z


def _batch(*args) -> object:
    return CliRunner().invoke(main, ["batch", *map(str, args)])


def _summary(zoo: Path) -> dict:
    return json.loads((zoo.parent / "shardquant-batch-summary.json").read_text())


def _download(repo: str, monkeypatch, cache: Path) -> Path:
    """The repo as a user gets it: every file, through huggingface_hub, into a fresh cache."""
    test_hub_local.use_cache(monkeypatch, cache)
    return Path(snapshot_download(repo))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_verified_outputs_are_pushed_and_the_pushed_repo_verifies(hub, tiny, token, tmp_path, monkeypatch):
    """A hub source in two formats and a source that does not exist: the two outputs go to private repos
    (one of which held a stray file, now deleted), the failed job to none; each repo, downloaded again,
    passes verify, and its card states the source and revision, format, flavor, recipe and the verify
    results, while the output's own files, manifest and card stay as convert wrote them."""
    stray = tmp_path / "stray-repo"
    stray.mkdir()
    (stray / "old-model.safetensors").write_bytes(b"\0" * 16)
    hub.add("team/tiny-fp8", stray)  # an earlier push left a file the output does not have
    zoo = _zoo(tmp_path / "z", "org/tiny", "./no-such-model")
    r = _batch(zoo, "--push-to", "team", "--push-private")
    assert r.exit_code == 1, r.output  # the missing model
    assert "Traceback" not in r.output
    doc = _summary(zoo)
    jobs = {(j["model"], j["format"]): j for j in doc["jobs"]}
    assert doc["push_counts"] == {"pushed": 2, "already_pushed": 0, "not_pushed": 2, "failed": 0}
    assert jobs[("no-such-model", "nvfp4")]["push"] == {"repo": "team/no-such-model-nvfp4", "status": "not pushed",
                                                         "reason": "the job failed"}
    created = {c["repo"]: c for c in hub.calls("create")}
    assert set(created) == {"team/tiny-nvfp4", "team/tiny-fp8"}  # never a failed job's repo
    assert created["team/tiny-nvfp4"]["body"]["visibility"] == "private" and created["team/tiny-nvfp4"]["status"] == 200
    assert created["team/tiny-fp8"]["status"] == 409  # it existed: kept, not created again
    assert not any(c["repo"].startswith("team/no-such") for c in hub.calls("commit") + hub.calls("preupload"))
    md = (zoo.parent / "shardquant-batch-summary.md").read_text()
    assert md.splitlines()[0].endswith("; pushed 2, already pushed 0, push failed 0")
    assert "| pushed |" in md.splitlines()[2] and "pushed to team/tiny-nvfp4 at " in md
    assert "pushed to team/tiny-nvfp4 at " in r.stderr
    record = json.loads((zoo.parent / publish.RECORD_NAME).read_text())
    assert not (zoo.parent / publish.PUSH_DIR).exists() or not any((zoo.parent / publish.PUSH_DIR).iterdir())

    for fmt in ("nvfp4", "fp8"):
        job, repo = jobs[("tiny", fmt)], f"team/tiny-{fmt}"
        out = Path(job["output"])
        assert job["push"]["status"] == "pushed" and job["push"]["commit"] == hub.repos[repo].commit
        assert record[repo] == {"commit": hub.repos[repo].commit, "manifest_sha256": _sha(out / MANIFEST_NAME),
                                "output": str(out)}
        assert hub.repos[repo].private == (fmt == "nvfp4")  # created private; an existing repo keeps its own
        got = _download(repo, monkeypatch, tmp_path / f"fresh-{fmt}")
        rep = verify(got)
        assert rep.ok, rep.violations
        names = {p.name for p in got.iterdir()}
        assert names == {p.name for p in out.iterdir()} | {".gitattributes"}  # the stray file is gone
        assert job["push"]["files"] == len(names) and job["push"]["bytes"] == sum(
            p.stat().st_size for p in got.iterdir())
        assert rep.files_checked == len(names) - 1  # every file but the manifest, by SHA-256
        for name in names - {"README.md", MANIFEST_NAME, ".gitattributes"}:
            assert (got / name).read_bytes() == (out / name).read_bytes(), name
        assert (got / ".gitattributes").read_text() == publish.GITATTRIBUTES_TEXT  # ours, not the hub's first one
        # the manifests differ only in the files table's entries for the card and .gitattributes
        mine, theirs = json.loads((out / MANIFEST_NAME).read_text()), json.loads((got / MANIFEST_NAME).read_text())
        assert {k: v for k, v in theirs.items() if k != "files"} == {k: v for k, v in mine.items() if k != "files"}
        assert set(theirs["files"]) == set(mine["files"]) | {".gitattributes"}
        assert {k: v for k, v in theirs["files"].items() if k not in ("README.md", ".gitattributes")} == {
            k: v for k, v in mine["files"].items() if k != "README.md"}
        # the card: the output's, with the verify results in its Verify section
        card, local = (got / "README.md").read_text(), (out / "README.md").read_text()
        assert "base_model:\n- org/tiny\n" in card and f"at revision `{tiny.commit}`" in card
        assert f"({fmt.upper()}, " in card and "## Recipe" in card
        i = card.index("`shardquant verify` on this output passed: ")
        j = card.index("`shardquant verify <model>` checks")
        assert card[:i] + card[j:] == local and card[:i].endswith("## Verify\n\n")  # only the results are new
        results = card[i:j]
        assert f"{rep.modules} quantized modules" in results and "Against its source: " in results
        assert "worst " in results and "floor " in results and "Engines: " in results and "passed:" not in local
        assert verify(out).ok  # the output itself is untouched
    assert not hub.repos["team/tiny-fp8"].root.joinpath("old-model.safetensors").exists()


def test_a_failed_push_is_the_jobs_error_and_a_rerun_finishes_it(hub, tiny, token, tmp_path):
    """The first push's commit fails: recorded as that job's error, the other job pushed, exit status 1.
    The next batch skips both conversions (complete) and pushes only the unfinished one; the one after
    pushes nothing. Without the record, pushing again sends nothing the hub has (the upload resumes)."""
    zoo = _zoo(tmp_path / "z", "org/tiny")
    hub.fail_commits = [507]  # a status huggingface_hub does not retry (utils/_http.py)
    r = _batch(zoo, "--push-to", "team", "--verify", "contract")
    assert r.exit_code == 1, r.output
    first = {j["format"]: j for j in _summary(zoo)["jobs"]}
    assert [j["status"] for j in first.values()] == ["converted", "converted"]
    bad = first["nvfp4"]
    assert bad["push"]["status"] == "failed" and "HTTP 507" in bad["push"]["error"]
    assert bad["error"] == f"push to team/tiny-nvfp4: {bad['push']['error']}"
    assert "run the batch again to resume the push" in bad["error"]
    assert first["fp8"]["push"]["status"] == "pushed"
    assert "push to team/tiny-nvfp4 FAILED" in r.stderr and "1 push(es) failed" in r.stderr
    fp8_commit = hub.repos["team/tiny-fp8"].commit

    hub.clear()
    r = _batch(zoo, "--push-to", "team", "--verify", "contract")
    assert r.exit_code == 0, r.output
    again = {j["format"]: j for j in _summary(zoo)["jobs"]}
    assert [j["status"] for j in again.values()] == ["skipped", "skipped"]
    assert again["nvfp4"]["push"]["status"] == "pushed" and again["nvfp4"]["error"] is None
    assert again["fp8"]["push"] == {"repo": "team/tiny-fp8", "status": "already pushed", "commit": fp8_commit}
    calls = hub.calls("create") + hub.calls("preupload") + hub.calls("commit")
    assert {c["repo"] for c in calls} == {"team/tiny-nvfp4"}
    assert hub.repos["team/tiny-fp8"].commit == fp8_commit

    hub.clear()
    assert _batch(zoo, "--push-to", "team", "--verify", "contract").exit_code == 0
    assert [j["push"]["status"] for j in _summary(zoo)["jobs"]] == ["already pushed", "already pushed"]
    assert not hub.calls("create") + hub.calls("preupload") + hub.calls("commit")

    (zoo.parent / publish.RECORD_NAME).unlink()  # forgotten: the library finds every file on the hub already
    commits = {k: v.commit for k, v in hub.repos.items()}
    hub.clear()
    assert _batch(zoo, "--push-to", "team", "--verify", "contract").exit_code == 0
    assert [j["push"]["status"] for j in _summary(zoo)["jobs"]] == ["pushed", "pushed"]
    assert len(hub.calls("preupload")) == 2 and not hub.calls("commit")
    assert {k: v.commit for k, v in hub.repos.items()} == commits


class HubV1(HfApi):
    """A huggingface_hub 1.x-shaped client: it has upload_large_folder (the signature of 1.x's
    hf_api.py), which keeps its resume records in the folder (.cache/huggingface/upload, as 1.x's
    _local_folder.py get_local_upload_paths) and returns nothing. It uploads through this
    installation's upload_folder to the stand-in, which skips .cache/huggingface."""

    large_calls: list[dict] = []

    def upload_large_folder(self, repo_id: str, folder_path, *, repo_type: str, revision: str | None = None,
                            private: bool | None = None, allow_patterns=None, ignore_patterns=None,
                            num_workers: int | None = None, print_report: bool = True,
                            print_report_every: int = 60) -> None:
        folder = Path(folder_path)
        HubV1.large_calls.append({"repo_id": repo_id, "folder": folder, "repo_type": repo_type, "private": private,
                                  "files": sorted(p.name for p in folder.iterdir())})
        meta = folder / ".cache" / "huggingface" / "upload"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / "README.md.metadata").write_text("resume record\n")
        self.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        self.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision)


def test_upload_large_folder_where_the_installed_client_resumes_only_with_it(hub, tiny, token, tmp_path, monkeypatch):
    """The upload call follows the installed huggingface_hub (shardquant/hub.py _upload_call): 2.x
    (installed here) has no upload_large_folder and its upload_folder resumes; a 1.x client whose
    upload_folder does not resume gets upload_large_folder, on a folder beside the summary (its resume
    records land there, never in the output), and the repo verifies the same."""
    assert not hasattr(HfApi(), "upload_large_folder") and hubmod._folder_upload_resumes()
    assert hubmod._upload_call(HfApi()) == "upload_folder"
    assert hubmod._upload_call(HubV1()) == "upload_folder"  # a later 1.x: upload_folder resumes, large is deprecated
    monkeypatch.setattr(hubmod, "_folder_upload_resumes", lambda: False)
    assert hubmod._upload_call(HubV1()) == "upload_large_folder" and hubmod._upload_call(HfApi()) == "upload_folder"
    monkeypatch.setattr(hubmod, "_api", HubV1)
    HubV1.large_calls.clear()
    z = tmp_path / "z"
    zoo = _zoo(z, "org/tiny", formats='["nvfp4"]', defaults='push_name = "{name}-{format}-{policy}"')
    jobs = batch.load_zoo(zoo, "team")
    (res,) = batch.run(jobs, device="cpu", verify_mode="source", push=publish.Push("team", z))
    assert res.push["status"] == "pushed", res.push
    (call,) = HubV1.large_calls
    assert call["repo_id"] == "team/tiny-nvfp4-shared" and call["repo_type"] == "model" and call["private"] is False
    assert call["folder"] == z / publish.PUSH_DIR / "team--tiny-nvfp4-shared"
    assert call["files"] == sorted([".gitattributes", *(p.name for p in Path(res.job.output).iterdir())])
    assert not (Path(res.job.output) / ".cache").exists() and verify(res.job.output).ok
    got = _download("team/tiny-nvfp4-shared", monkeypatch, tmp_path / "fresh")
    assert verify(got).ok and not (got / ".cache").exists()


def test_push_settings_are_checked_before_anything_runs(hub, token, tmp_path, monkeypatch):
    """push_name is a zoo key checked with the others, each problem with its line: its template's
    fields, the repo ids it gives on the hub and their being distinct. Bad options are one line each."""
    z = tmp_path / "zoo.toml"
    z.write_text('[defaults]\n'                               # 1
                 'formats = ["nvfp4", "fp8"]\n'               # 2
                 'push_name = "{name}-{model}"\n'             # 3: unknown field
                 '\n'
                 '[[model]]\n'                                # 5
                 'source = "org/a"\n'
                 'push_name = "{name} {format}"\n'            # 7: a space, in both jobs
                 '\n'
                 '[[model]]\n'                                # 9
                 'source = "org/b"\n'
                 'push_name = "{name}"\n')                    # 11: the same repo for both formats
    with pytest.raises(batch.ZooError) as e:
        batch.load_zoo(z, "team")
    lines = str(e.value).splitlines()
    assert lines[0] == f"4 problems in {z}:"
    assert lines[1].startswith(f"{z}:3: [defaults]: push_name template names model; it may use {{flavor}}")
    assert lines[2].startswith(f"{z}:7: model 1 (a, nvfp4): repo id 'team/a nvfp4' is not valid on the hub (")
    assert lines[3].startswith(f"{z}:7: model 1 (a, fp8): repo id 'team/a fp8' is not valid")
    assert lines[4] == (f"{z}:11: model 2 (b, fp8): repo team/b is also job 3's: make push_name tell them apart "
                        "({name}, {format})")
    z.write_text('[defaults]\nformats = ["nvfp4"]\n\n[[model]]\nsource = "org/a"\npush_name = "x/y"\n')
    assert len(batch.load_zoo(z)) == 1  # without --push-to the name is not a repo id yet
    with pytest.raises(batch.ZooError, match=r"zoo.toml:6: model 1 \(a, nvfp4\): repo id 'team/x/y' is not valid"):
        batch.load_zoo(z, "team")

    zoo = _zoo(tmp_path / "ok", "org/a")
    for args, want in ((["--push-to", "my team"], "error: --push-to 'my team': not a hub namespace"),
                       (["--push-to", "team/sub"], "error: --push-to 'team/sub': not a hub namespace"),
                       (["--push-to", "team", "--verify", "none"], "error: --push-to pushes verified outputs only"),
                       (["--push-private"], "error: --push-private needs --push-to ORG")):
        r = _batch(zoo, *args)
        assert r.exit_code == 1 and r.stderr.splitlines() == [r.stderr.splitlines()[0]], r.output
        assert r.stderr.startswith(want) and "Traceback" not in r.output, r.output
    monkeypatch.delenv("HF_TOKEN")
    r = _batch(zoo, "--push-to", "team")
    assert r.exit_code == 1 and r.stderr == "error: --push-to needs a hub token: set HF_TOKEN or run `hf auth login`\n"
    assert not (tmp_path / "ok" / "out").exists() and not hub.requests()
    assert TOKEN not in r.output


def test_dry_run_shows_what_would_be_pushed(hub, token, tmp_path):
    """--dry-run --push-to: per job its repo id, file count and bytes, or that it is already pushed;
    nothing is converted and the hub is not asked."""
    write_checkpoint(tmp_path / "m0", qwen3_moe(hidden=64, layers=2, experts=4, inter=32), shard_bytes=100_000)
    zoo = _zoo(tmp_path, "./m0")
    r = _batch(zoo, "--dry-run", "--push-to", "team", "--push-private")
    assert r.exit_code == 0, r.output
    plans = r.stdout.splitlines()
    assert len(plans) == 4 and plans[0].startswith("m0/nvfp4: modelopt flavor; ")
    assert plans[1].startswith("m0/nvfp4: would push to team/m0-nvfp4 (private): ") and " MB of weights" in plans[1]
    n = int(plans[1].split(": ")[2].split()[0])
    assert n >= 6  # shards, index, config, quantization config, card, manifest, .gitattributes
    assert plans[3].startswith("m0/fp8: would push to team/m0-fp8 (private): ")
    assert not (tmp_path / "out").exists() and not hub.requests()
    (res,) = batch.run(batch.load_zoo(zoo)[:1], device="cpu", verify_mode="contract",
                       push=publish.Push("team", tmp_path))
    assert res.push["status"] == "pushed" and res.push["files"] == n
    r = _batch(zoo, "--dry-run", "--push-to", "team")
    assert r.stdout.splitlines()[1] == f"m0/nvfp4: already pushed to team/m0-nvfp4 at {res.push['commit'][:12]}"


def test_a_card_without_shardquants_verify_section_is_not_pushed():
    """with_verify changes only the Verify section convert wrote; a card without it (edited, or of
    another shardquant version) is an error, not a card pushed without results."""
    from shardquant.card import VerifyFacts, with_verify
    from shardquant.errors import ShardquantError

    facts = VerifyFacts(ok=True, modules=3, files=5, hashed=True)
    with pytest.raises(ShardquantError, match=r"README.md: no Verify section as shardquant writes it"):
        with_verify("# my own card\n", facts, "org/m", "abc")


def test_the_pushed_manifest_names_a_local_source_by_its_directory_only(tmp_path):
    """A local source's absolute path (where it lay on this machine) is not published: the pushed
    manifest keeps the directory's name; the staged repo still verifies."""
    from shardquant.card import VerifyFacts
    from shardquant.convert import convert
    from shardquant.testing import qwen3_moe, write_checkpoint

    src = write_checkpoint(tmp_path / "home" / "alice" / "secret-project" / "m0", qwen3_moe(hidden=64, layers=1,
                                                                                            experts=4, inter=32))
    out = tmp_path / "out"
    convert(str(src), out, "fp8", device="cpu")
    rep = verify(out, str(src), device="cpu")
    names, _ = publish.stage(out, tmp_path / "staged", VerifyFacts.of(rep))
    mine = json.loads((out / MANIFEST_NAME).read_text())
    theirs = json.loads((tmp_path / "staged" / MANIFEST_NAME).read_text())
    assert mine["source"]["path"] == str(src.resolve()) and theirs["source"]["path"] == "m0"
    assert {k: v for k, v in theirs["source"].items() if k != "path"} == {
        k: v for k, v in mine["source"].items() if k != "path"}
    assert "alice" not in (tmp_path / "staged" / MANIFEST_NAME).read_text()
    assert "alice" not in (tmp_path / "staged" / "README.md").read_text()
    import shutil

    shutil.copytree(tmp_path / "staged", tmp_path / "as-downloaded")  # the staged links become the files
    assert verify(tmp_path / "as-downloaded").ok
