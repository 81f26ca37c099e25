import json

import pytest
from click.testing import CliRunner

from shardquant.cli import main


def test_example_converts_and_names_its_format(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", "examples/tiny-moe", "--format", "nvfp4", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_algo"] == "W4A16_NVFP4"
    assert (out / "model.safetensors.index.json").exists()


def test_cli_size_defaults_are_the_library_defaults():
    import click

    from shardquant.cli import _size, _size_or_auto, convert
    from shardquant.convert import DEFAULT_GPU_MEMORY
    from shardquant.plan import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE

    defaults = {p.name: p.default for p in convert.params if isinstance(p, click.Option)}
    assert _size(None, None, defaults["max_shard_size"]) == DEFAULT_SHARD_SIZE
    assert _size(None, None, defaults["memory_budget"]) == DEFAULT_MEMORY_BUDGET
    assert _size_or_auto(None, None, defaults["gpu_memory"]) == DEFAULT_GPU_MEMORY is None  # auto
    assert _size_or_auto(None, None, "12GiB") == 12 * 2**30


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("5G", 5 * 10**9), ("5 gb", 5 * 10**9),
                                        ("5GiB", 5 * 2**30), ("5Gi", 5 * 2**30), ("512MiB", 512 * 2**20),
                                        ("1.5M", 1_500_000), ("40000", 40_000)])
def test_sizes_in_the_usual_spellings(text, value):
    from shardquant.cli import _size

    assert _size(None, None, text) == value


@pytest.mark.parametrize("text", ["5XB", "G", "-1G", "0", "5GBB"])
def test_bad_sizes_are_refused(text):
    import click

    from shardquant.cli import _size

    with pytest.raises(click.BadParameter):
        _size(None, None, text)


def test_e4m3_table_equals_ml_dtypes_for_every_byte():
    import ml_dtypes
    import numpy as np

    from shardquant.formats.base import E4M3_VALUES, e4m3_values

    want = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(E4M3_VALUES.view(np.uint32), want.view(np.uint32))  # NaNs and -0.0 included
    assert np.isnan(e4m3_values(np.array([0x7F, 0xFF], np.uint8))).all()


def test_the_command_line_starts_without_ml_dtypes():
    """ml_dtypes costs about half a second to import; --help and plan do not need it
    (shardquant/formats/base.py e4m3_dtype loads it on the first encode)."""
    import subprocess
    import sys

    code = "import sys, shardquant.cli, shardquant.plan, shardquant.verify; print('ml_dtypes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
