"""The offline demo at a reduced size: files exist and are valid, the summary table shows PSA sparse."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest

from psa_diffusers.cli import main  # noqa: E402

FRAMES = 9
SIZE = 64
ARGS = ["--height", str(SIZE), "--width", str(SIZE), "--frames", str(FRAMES), "--steps", "2"]
ARGS += ["--block-q", "64", "--block-kv", "32"]  # 3 x 8 x 8 = 192 video tokens: 3 x 6 blocks
VIDEOS = ["cogvideox_dense.mp4", "cogvideox_psa.mp4", "wan_dense.mp4", "wan_psa.mp4"]
PICTURES = ["level_maps.png", "density.png"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--output", str(out), "--device", "cpu", *ARGS])
    return code, out, stdout.getvalue()


def test_demo_succeeds_and_shows_progress(demo):
    code, _, text = demo
    assert code == 0
    assert "CogVideoX PSA   step  2/2" in text and "Wan2.1 dense step  1/2" in text
    assert "demo finished in" in text


def test_videos_are_readable_with_the_right_frame_count(demo):
    import imageio.v3 as iio

    _, out, _ = demo
    for name in VIDEOS:
        frames = iio.imread(out / name, index=None)
        assert frames.shape == (FRAMES, SIZE, SIZE, 3), name
        assert frames.dtype == np.uint8


def test_pictures_are_readable_pngs(demo):
    import imageio.v3 as iio

    _, out, _ = demo
    for name in PICTURES:
        image = iio.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name


def test_table_has_psa_densities_below_one(demo):
    _, _, text = demo
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^(CogVideoX|Wan2\.1)\s+(dense|PSA)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+(\S+)$", line)
        if match:
            rows[match[1], match[2]] = match.groups()[2:]
    assert set(rows) == {(m, a) for m in ("CogVideoX", "Wan2.1") for a in ("dense", "PSA")}
    for model in ("CogVideoX", "Wan2.1"):
        seconds, per_step, mean, sparse, diff = rows[model, "PSA"]
        assert 0 < float(sparse) < 1 and float(sparse) <= float(mean) < 1, (model, rows[model, "PSA"])
        assert float(seconds) > 0 and 0 <= float(diff) < 1
        assert rows[model, "dense"][2] == "1.000"
