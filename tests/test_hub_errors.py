"""Hub failures become one-line messages that say what to do (the first hub call, HfApi.resolve_revision,
is stubbed; tests/test_hub_local.py gives each failure through a local stand-in for the hub's HTTP API)."""

import pytest

try:  # the HTTP client huggingface_hub builds its errors on (httpx2 from huggingface_hub 2)
    import httpx2 as httpx
except ImportError:
    import httpx
from click.testing import CliRunner

from shardquant.cli import main


def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "https://hub.invalid/api/models/org/name"))


def _errors():
    from huggingface_hub import errors as E

    yield "revision", E.RevisionNotFoundError("404 Revision Not Found\nmore", response=_response(404)), \
        "revision 'v9' does not exist"
    yield "gated", E.GatedRepoError("403 gated\nmore", response=_response(403)), "accept its terms on the hub and set HF_TOKEN"
    yield "401/404", E.RepositoryNotFoundError("401 Client Error\nmore", response=_response(401)), \
        "private repos need HF_TOKEN"
    yield "offline", E.LocalEntryNotFoundError("cannot find in cache\nmore"), "download it first or unset HF_HUB_OFFLINE"
    yield "5xx", E.HfHubHTTPError("502 Bad Gateway\nline two", response=_response(502)), "check the network"
    yield "transport", httpx.ConnectError("[Errno 111] Connection refused\nline two"), "check the network"
    yield "oserror", OSError(28, "No space left on device"), "No space left on device"


@pytest.mark.parametrize("label,exc,hint", list(_errors()), ids=[c[0] for c in _errors()])
def test_hub_failure_is_one_clean_line(tmp_path, monkeypatch, label, exc, hint):
    import huggingface_hub

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(huggingface_hub.HfApi, "resolve_revision", fail)
    r = CliRunner().invoke(main, ["convert", "org/name", "--revision", "v9", "--format", "nvfp4",
                                  "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: org/name"), r.output
    assert hint in lines[0]
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()
