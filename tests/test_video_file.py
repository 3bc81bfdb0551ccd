"""llava.video (PyAV) and run_llava --video-file on a tiny Video-LLaVA, every method."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av")

from learnpruner_ext import available_methods  # noqa: E402
from learnpruner_ext.methods import get_method_class  # noqa: E402
from learnpruner_ext.tiny import save_tiny_checkpoint  # noqa: E402
from llava.video import VideoError, load_video, sample_indices, save_video  # noqa: E402


def test_sample_indices_follow_video_llava():
    """np.linspace(0, n - 1, 8, dtype=int): n = 10 -> 0, 9/7 = 1.29, 2.57, 3.86, 5.14, 6.43, 7.71, 9 truncated ->
    [0, 1, 2, 3, 5, 6, 7, 9]; n = 8 -> every frame; n = 37 -> steps of 36/7 = 5.14: [0, 5, 10, 15, 20, 25, 30, 36]."""
    assert sample_indices(10, 8) == [0, 1, 2, 3, 5, 6, 7, 9]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(37, 8) == [0, 5, 10, 15, 20, 25, 30, 36]


def test_round_trip_returns_the_sampled_frames(tmp_path):
    """10 flat frames of red 25 i: the 8 sampled come back with reds 25 x [0, 1, 2, 3, 5, 6, 7, 9] (codec error < 8)."""
    frames = [Image.new("RGB", (64, 48), (25 * i, 100, 60)) for i in range(10)]
    frames_back = load_video(save_video(frames, tmp_path / "v.mp4", fps=5), 8)
    assert len(frames_back) == 8 and frames_back[0].size == (64, 48)
    reds = [int(np.asarray(f)[24, 32, 0]) for f in frames_back]
    assert all(abs(r - 25 * i) < 8 for r, i in zip(reds, [0, 1, 2, 3, 5, 6, 7, 9])), reds


def test_bad_videos_give_one_clear_error(tmp_path):
    with pytest.raises(VideoError, match="not found; check the path"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="cannot decode video .*re-encode"):
        load_video(tmp_path / "junk.mp4")
    short = save_video([Image.new("RGB", (32, 32))] * 3, tmp_path / "short.mp4")
    with pytest.raises(VideoError, match="has 3 decodable frames, fewer than the 8 .*--num-frames 3"):
        load_video(short, 8)


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_cli")
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(12)]
    return save_tiny_checkpoint(root / "model", family="video_llava"), save_video(frames, root / "clip.mp4")


@pytest.mark.parametrize("method", [m for m in available_methods() if not get_method_class(m).requires])
def test_run_llava_answers_a_video_with_every_method(video_ckpt, method):
    """The CLI path: 8 frames of the 12-frame clip, 8 x 17 <video> placeholders, the method's plan measured."""
    from llava.eval import run_llava

    model, clip = video_ckpt
    budget = {"none": [], "fastv": ["--visual-token-budget", "80"], "dart": ["--visual-token-budget", "80"],
              "atp_fixed": ["--visual-token-budget", "80"]}  # rate 2/3 at 2/3 of 4 layers: 68 <= T <= 113 on 136
    args = budget.get(method, ["--visual-token-budget", "40"])
    result = run_llava.main(["--model-path", str(model), "--video-file", str(clip), "--query", "What moves?",
                             "--pruning-method", method, *args, "--max_new_tokens", "3", "--device", "cpu", "--json"])  # fmt: skip
    assert isinstance(result["answer"], str) and result["image_tokens"] == [8 * 17]
    assert result["average_vision_tokens"] == pytest.approx(8 * 17 if method == "none" else int(args[1]), abs=1.0)
