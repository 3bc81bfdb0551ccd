"""toyworld.video (clips whose questions need time) and toyworld.video_table (the toy video table)."""

import json
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("av")

from toyworld import video, video_table  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_video")
    video.generate(str(out), seed=3, num_train=60, num_test=30, progress=False)
    return out


def test_layout_is_video_llavas_and_deterministic(data, tmp_path):
    q, a = json.loads((data / "test_q.json").read_text()), json.loads((data / "test_a.json").read_text())
    assert len(q) == len(a) == 30 and set(q[0]) == {"video_name", "question", "question_id"}
    assert [x["question_id"] for x in q] == [x["question_id"] for x in a]
    assert Counter(x["type"] for x in a) == {"direction": 10, "appear": 10, "frames": 10}
    train = json.loads((data / "train.json").read_text())
    assert all(e["video"].startswith("videos/") and len(e["conversations"]) == 6 for e in train)
    assert {t["question_type"] for e in train for t in e["conversations"] if t["from"] == "human"} == set(video.TYPES)
    video.generate(str(tmp_path), seed=3, num_train=60, num_test=30, progress=False)
    for name in ("train.json", "test_q.json", "test_a.json", "test_scenes.jsonl"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes()


def test_answers_are_balanced(data):
    """On 600 clips no answer of a type takes more than 60% of it (chance: 25 / 50 / 20 %)."""
    clips = [video.sample_clip(np.random.default_rng([0, 0, i])) for i in range(600)]
    for qtype in video.TYPES:
        counts = Counter(video.question(c, qtype)[1] for c in clips)
        assert max(counts.values()) / len(clips) < 0.6, (qtype, counts)


def test_questions_need_more_than_one_frame():
    """direction: the mover's box in the first and the last frame gives the direction (the move is 7 steps of
    12 px along one axis); a single frame does not, since the start is random along the path (over 400 clips,
    the mover's x in frame 3 spans both halves of the image for left- and for right-movers). appear: every
    object is present in some frame and absent in another for both answers (its first and last frames differ).
    frames: the answer equals the number of frames showing the object."""
    xs = {"left": [], "right": []}
    for i in range(400):
        clip = video.sample_clip(np.random.default_rng([1, 0, i]))
        mover, event, blinker = clip["objects"]
        first, last = mover["boxes"][0], mover["boxes"][-1]
        moved = {"right": last[0] - first[0], "left": first[0] - last[0], "down": last[1] - first[1], "up": first[1] - last[1]}
        assert moved[mover["answer"]] == video.STEP * (video.FRAMES - 1)
        if mover["answer"] in xs:
            xs[mover["answer"]].append(mover["boxes"][3][0])
        present = [b is not None for b in event["boxes"]]
        assert any(present) and not all(present)
        assert present[-1] == (event["answer"] == "appear") and present[0] == (event["answer"] == "disappear")
        assert sum(b is not None for b in blinker["boxes"]) == int(blinker["answer"])
    for direction, values in xs.items():
        assert min(values) < 192 / 2 < max(values), direction


def test_video_table_by_hand(data, tmp_path):
    """3 questions (direction 'left', appear 'appear', frames '3'); vanilla answers left / appear / 4 (2 right),
    the run answers Left. / disappear / 3 (2 right after normalisation): accuracy 66.7 both, difference 0,
    loyalty 1/3 (only 'left' agrees)."""
    key = [{"question_id": "a", "answer": "left", "type": "direction"},
           {"question_id": "b", "answer": "appear", "type": "appear"},
           {"question_id": "c", "answer": "3", "type": "frames"}]  # fmt: skip

    def write(name, preds, method, budget):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": q, "pred": p, "method": method, "budget": budget,
                                            "vision_tokens_per_layer": [10, 10]}) + "\n"
                                for q, p in zip("abc", preds)))  # fmt: skip
        return str(path)

    base = write("none.jsonl", ["left", "appear", "4"], "none", None)
    run = write("random.jsonl", ["Left.", "disappear", "3"], "random", 5)
    rows = video_table.table(key, base, [run])
    assert [r["run"] for r in rows] == ["none", "random"]
    assert rows[1]["accuracy"] == pytest.approx(200 / 3) and rows[1]["diff"][0] == pytest.approx(0.0)
    assert rows[1]["by_type"] == {"direction": 100.0, "appear": 0.0, "frames": 100.0}
    assert rows[1]["loyalty"] == pytest.approx(100 / 3)
    assert "| random | 5 | 10.0 | 100.0 | 0.0 | 100.0 | **66.7** |" in video_table.markdown(rows)
    with pytest.raises(ValueError, match="no answer for 1 questions"):
        video_table.table(key + [{"question_id": "d", "answer": "up", "type": "direction"}], base, [run])
