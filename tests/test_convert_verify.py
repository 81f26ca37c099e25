"""`convert --verify`: the contract check runs on the output before success is declared."""

import pytest

from shardquant import testing
from click.testing import CliRunner

import shardquant.verify as verify_mod
from shardquant.report import Violation
from shardquant.cli import main
from shardquant.convert import convert
from shardquant.errors import OutputError
from shardquant.testing import qwen3_moe, write_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src"), qwen3_moe(), shard_bytes=60_000)


@pytest.fixture(scope="module")
def tiled_src(tmp_path_factory):
    """qwen3_moe in whole 128x128 tiles, for formats with 2-D block scales (Format.block)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiled"), testing.TILED["qwen3_moe"](), shard_bytes=200_000)


@pytest.mark.parametrize("fmt,flavor", testing.served())
def test_verify_flag_passes_our_output(src, tiled_src, tmp_path, fmt, flavor):
    from shardquant import formats

    src = tiled_src if formats.declared(fmt).block else src
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(src), "--format", fmt, "--flavor", flavor, "-o", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert f"verified: {out} meets the {flavor} contract" in r.output
    assert (out / INDEX).exists()


def test_verify_failure_is_an_error_and_takes_the_index_away(src, tmp_path, monkeypatch):
    bad = Violation("fused-scale", "model.layers.0.mlp.experts.3", "gate/up global scales differ")
    monkeypatch.setattr(verify_mod, "verify_contract", lambda path, **kw: [bad])
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"fails verification: 1 violation\(s\) of fused-scale .*experts\.3"):
        convert(str(src), out, "nvfp4", device="cpu", verify=True)
    assert not (out / INDEX).exists()
    monkeypatch.undo()
    # the shards are finished and journaled: the re-run resumes them and now verifies
    r = convert(str(src), out, "nvfp4", device="cpu", verify=True)
    assert (out / INDEX).exists() and r.resumed == len(r.plan.shards)
