"""generate(): one pipeline call with per-step timing, written to an mp4 by diffusers' export_to_video."""

from __future__ import annotations

from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest

from psa_diffusers.diffusers.tiny import TINY_TEXT_LEN, tiny_cogvideox_pipeline, tiny_wan_pipeline  # noqa: E402
from psa_diffusers.generation import generate  # noqa: E402

FRAMES = 9
SIZE = 64


@pytest.mark.parametrize("make, fps", [(tiny_cogvideox_pipeline, 8), (tiny_wan_pipeline, 16)], ids=["cogvideox", "wan"])
def test_generate_writes_an_mp4_with_every_frame(tmp_path, make, fps):
    path = tmp_path / "new" / "folder" / "video.mp4"  # folders are created
    steps = []
    result = generate(
        make(),
        "a cat walks in the rain",
        output=path,
        on_step=lambda step, num_steps, seconds: steps.append((step, num_steps)),
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=2,
        max_sequence_length=TINY_TEXT_LEN,
    )
    assert result.output == path and path.is_file()
    video = iio.imread(path, index=None)
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == np.uint8
    assert result.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert iio.immeta(path)["fps"] == fps  # the model family's frame rate
    assert steps == [(0, 2), (1, 2)] and len(result.step_seconds) == 2
    assert result.stats == {} and result.mean_density == 1.0  # no handle: dense
    # lossy H.264 of noise, but the same picture on average
    assert abs(video.mean() / 255.0 - result.frames.mean()) < 0.05


class _FakePipeline:
    """Returns fixed frames and calls the step callback like a diffusers pipeline."""

    def __init__(self, frames: np.ndarray, steps: int) -> None:
        self.frames, self.steps = frames, steps

    def __call__(self, prompt, *, callback_on_step_end, num_inference_steps, **kwargs):
        for step in range(self.steps):
            callback_on_step_end(self, step, 1000 - step, {})
        return SimpleNamespace(frames=[self.frames])


def test_out_of_range_frames_are_clipped_not_wrapped(tmp_path):
    """export_to_video casts frame * 255 to uint8: 1.5 would wrap to 126 without the clip."""
    frames = np.zeros((3, 32, 32, 3), dtype=np.float32)
    frames[0], frames[1], frames[2] = 1.5, -0.5, 1.0
    result = generate(_FakePipeline(frames, 3), "x", output=tmp_path / "clip.mp4", fps=4, num_inference_steps=3)
    video = iio.imread(result.output, index=None).astype(float)
    assert video.shape == (3, 32, 32, 3)
    assert video[0].mean() > 240 and video[1].mean() < 15 and video[2].mean() > 240
    assert iio.immeta(result.output)["fps"] == 4
    assert len(result.step_seconds) == 3


def test_no_output_writes_nothing(tmp_path):
    frames = np.full((2, 16, 16, 3), 0.5, dtype=np.float32)
    result = generate(_FakePipeline(frames, 1), "x", num_inference_steps=1)
    assert result.output is None and list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(result.frames, frames)
