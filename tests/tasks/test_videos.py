"""Evaluation rollouts as GIF and MP4: what is written reads back as the frames that went in."""

import imageio.v3 as iio
import numpy as np
from PIL import Image

from tasks.evaluation import write_gif, write_mp4


def frames(n: int, height: int, width: int) -> list[np.ndarray]:
    """n flat grey frames (height, width, 3) uint8, each brighter than the last."""
    return [np.full((height, width, 3), 20 * i, dtype=np.uint8) for i in range(n)]


def test_mp4_reads_back_as_the_frames(tmp_path):
    path = tmp_path / "videos" / "ep.mp4"
    write_mp4(frames(8, 64, 48), path, fps=10)
    video = iio.imread(path, plugin="FFMPEG")  # (T, H, W, 3)
    assert video.shape == (8, 64, 48, 3)
    assert np.abs(video.mean(axis=(1, 2, 3)) - 20 * np.arange(8)).max() < 3  # lossy, but each frame in place
    assert iio.immeta(path, plugin="FFMPEG")["fps"] == 10
    assert [p.name for p in path.parent.iterdir()] == ["ep.mp4"]  # no temp file left behind


def test_mp4_pads_odd_sizes_to_even(tmp_path):
    write_mp4(frames(3, 33, 47), tmp_path / "odd.mp4", fps=10)
    assert iio.imread(tmp_path / "odd.mp4", plugin="FFMPEG").shape == (3, 34, 48, 3)


def test_gif_reads_back_as_the_frames(tmp_path):
    write_gif(frames(4, 16, 16), tmp_path / "ep.gif", fps=10)
    with Image.open(tmp_path / "ep.gif") as gif:
        assert gif.n_frames == 4 and gif.info["duration"] == 100
