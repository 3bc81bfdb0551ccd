"""The demo through gradio_client: answers, overlay pixels vs reported R1/R2, bad input, concurrency."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from learnpruner_ext import available_methods
from learnpruner_ext.visualize import DIVERSE_COLOR, STAGE1_COLOR, STAGE2_COLOR, cell_size
from learnpruner_ext.tiny import random_image as make_image


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    make_image(7, size=(80, 52)).save(path)  # not square: the overlay is on the padded square
    return str(path)


def ask(client, image, question="What color is the background?", method="learnpruner", budget=6, layer=3, unpruned=False):
    return client.predict(image, question, method, budget, layer, unpruned, api_name="/ask")


def count_from_pixels(path, grid):
    cell = cell_size(grid)
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape[0] >= grid * cell and arr.shape[1] >= grid * cell
    r1 = r2 = diverse = 0
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        centre = tuple(int(v) for v in arr[r * cell + cell // 2, c * cell + cell // 2])
        corner = tuple(int(v) for v in arr[r * cell, c * cell])
        r1 += centre in (STAGE1_COLOR, DIVERSE_COLOR, STAGE2_COLOR)
        r2 += centre == STAGE2_COLOR
        diverse += corner == DIVERSE_COLOR
    return r1, r2, diverse


def test_answer_and_overlay_match_trace(client, image_file):
    answer, unpruned, overlay, chart, stats, status, info = ask(client, handle_file(image_file), unpruned=True)
    assert status.startswith("OK"), status
    assert answer and unpruned
    assert info["r1"] == 12 and info["r2"] == 4 and info["layer"] == 3  # T=6, 16 tokens, 8 layers, k=3, rho=3
    assert info["vision_tokens_per_layer"] == [12] * 3 + [4] * 5
    r1, r2, diverse = count_from_pixels(overlay, info["grid"])
    assert (r1, r2) == (info["r1"], info["r2"])
    assert diverse == info["marked"]["diverse"] == round(0.1 * info["r1"])
    assert chart is not None and "TFLOPs" in stats
    assert 0 < info["est_tflops"] < info["est_tflops_unpruned"]


def test_method_without_stage2(client, image_file):
    *_, status, info = ask(client, handle_file(image_file), method="none", budget=16)
    assert status.startswith("OK"), status
    assert info["r1"] == 16 and info["r2"] is None and info["budget"] is None  # the budget box is ignored for none


def test_budget_rounding_is_reported(client, image_file):
    """T=1 on 16 tokens, 8 layers, k=3: R2 = ceil(8/(3*3+5)) = 1, R1 = 3 -> (3*3 + 1*5)/8 = 1.75 per layer."""
    *_, status, info = ask(client, handle_file(image_file), budget=1)
    assert status.startswith("OK") and "achieves 1.75" in status and info["average_vision_tokens"] == 1.75


def test_bad_inputs_then_good_request(client, image_file, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image")
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)  # 72 Mpx > load_image's limit, tiny file
    wide = tmp_path / "wide.png"
    Image.new("RGB", (5000, 40), (10, 200, 10)).save(wide)

    assert "No image" in ask(client, None)[5]
    assert "not a readable image" in ask(client, handle_file(str(not_image)))[5]
    assert "too large" in ask(client, handle_file(str(huge)))[5]
    assert "Empty question" in ask(client, handle_file(image_file), question="   ")[5]
    status = ask(client, handle_file(image_file), question="<image><image> What is this?")[5]
    assert status.startswith("Error: Invalid question") and "2 '<image>' tokens" in status
    assert "Invalid settings" in ask(client, handle_file(image_file), layer=99)[5]
    if "fastv" in available_methods():  # all 16 tokens in layers [0, 2) of 8: the average is >= 5
        assert "Infeasible budget" in ask(client, handle_file(image_file), method="fastv", budget=1, layer=2)[5]

    answer, *_, status, info = ask(client, handle_file(str(wide)))
    assert status.startswith("OK") and "downscaled" in status and answer
    assert max(info["image_size"]) == 4096

    answer, *_, status, info = ask(client, handle_file(image_file))
    assert status.startswith("OK") and answer


def test_eight_concurrent_requests(client, demo_server, tmp_path):
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        make_image(100 + i).save(path)
        paths.append(str(path))
    jobs = [(paths[i % 4], ["What shape is the object?", "How many objects are there?"][i % 2]) for i in range(8)]
    expected = {job: ask(client, handle_file(job[0]), question=job[1])[0] for job in set(jobs)}

    def one(job):
        return ask(client, handle_file(job[0]), question=job[1])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    for job, result in zip(jobs, results):
        assert result[5].startswith("OK"), result[5]
        assert result[0] == expected[job]
