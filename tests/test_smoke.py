import json

from click.testing import CliRunner

from shardquant.cli import main


def test_example_converts_and_names_its_format(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", "examples/tiny-moe", "--format", "nvfp4", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_algo"] == "W4A16_NVFP4"
    assert (out / "model.safetensors.index.json").exists()
