"""The demo on a tiny LLaVA-NeXT (anyres) checkpoint: per-image N_i, plan, budget scope, base-crop overlay.

The tiny model (``learnpruner_ext.tiny``, family ``llava_next``) has 56 px crops of 4x4 = 16 patches, L = 4 LLM
layers and the reference N = 5 x 16 = 80; the test images of 64x48 and 40x120 px get N_i = 44 and 76
(tests/test_llava_next.py), 112x112 gets N_i = 88 > N. LearnPruner's default k on 4 layers is
``round(4 * 12 / 32) = 2`` and rho = 3, so its plan is ``R2 = ceil(T_i * 4 / (2 * 3 + 2))``, ``R1 = 3 * R2``.
"""

import socket

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from learnpruner_ext.tiny import random_image, save_tiny_checkpoint
from learnpruner_ext.visualize import DIVERSE_COLOR, STAGE1_COLOR, STAGE2_COLOR, cell_size
from llava.serve.gradio_web_server import InputProblem, build_demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


N, L, P = 80, 4, 16  # the tiny NeXT's reference tokens, LLM layers, patches per crop
SIZES = {(64, 48): 44, (40, 120): 76, (112, 112): 88}  # (width, height) -> N_i
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def next_demo(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_next") / "model", family="llava_next", seed=0)
    demo = build_demo(str(path), device="cpu", max_new_tokens=6, concurrency_limit=2)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, Client(url, verbose=False)
    demo.close()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("next_images")
    files = {}
    for i, size in enumerate(SIZES):
        files[size] = str(folder / f"img{i}.png")
        random_image(i + 1, size).save(files[size])
    return files


def ask(demo, image, method="learnpruner", budget=20, layer=None, unpruned=False, scope="absolute"):
    return demo.backend.answer(image, QUESTION, method, budget, layer, unpruned, scope)


def test_backend_reports_anyres(next_demo):
    backend = next_demo[0].backend
    assert (backend.family, backend.num_vision_tokens, backend.num_layers, backend.grid) == ("llava_next", N, L, 4)
    for size, n_i in SIZES.items():
        assert backend.image_layout(random_image(0, size))[0] == n_i


@pytest.mark.parametrize("scope", ["scaled", "absolute"])
def test_full_budget_answer_equals_unpruned(next_demo, image_files, scope):
    """T = N keeps every token of an image under ``scaled`` (T_i = round(80 * N_i / 80) = N_i), and under
    ``absolute`` of the images with N_i <= N (T_i = min(80, N_i)); the answer is then the unpruned one."""
    demo = next_demo[0]
    sizes = list(SIZES) if scope == "scaled" else [s for s, n_i in SIZES.items() if n_i <= N]
    for size in sizes:
        n_i = SIZES[size]
        answer, unpruned, *_, status, info = ask(demo, image_files[size], budget=N, unpruned=True, scope=scope)
        assert status.startswith("OK"), status
        assert info["image_tokens"] == n_i and info["vision_tokens_per_layer"] == [n_i] * L
        assert answer == unpruned != ""
    # the equality can fail: a real pruning budget changes at least one of these answers
    pruned = [ask(demo, image_files[s], budget=4, unpruned=True, scope=scope)[:2] for s in sizes]
    assert any(a != u for a, u in pruned)


# scaled: T_i = round(20 * N_i / 80) -> 11 and 19; R2 = ceil(11 * 4 / 8) = 6, R1 = 18; R2 = ceil(19 * 4 / 8) = 10, R1 = 30
@pytest.mark.parametrize("size,t_i,r1,r2", [((64, 48), 11, 18, 6), ((40, 120), 19, 30, 10)])
def test_chart_and_stats_follow_the_image_plan(next_demo, image_files, size, t_i, r1, r2):
    demo = next_demo[0]
    n_i = SIZES[size]
    _, _, overlay, chart, stats, status, info = ask(demo, image_files[size], budget=20, scope="scaled")
    trace = demo.backend.model.last_pruning_trace()
    assert trace.image_tokens == [n_i] and trace.image_plans == [{"r1": r1, "r2": r2}]
    assert trace.budget_scope == info["budget_scope"] == "scaled"
    assert (info["image_tokens"], info["image_budget"], info["r1"], info["r2"], info["layer"]) == (n_i, t_i, r1, r2, 2)
    expected = [r1, r1, r2, r2]
    assert info["vision_tokens_per_layer"] == trace.vision_tokens_per_layer == expected
    unpruned_bars, method_bars = chart.axes[0].containers
    assert [b.get_height() for b in method_bars] == expected
    assert [b.get_height() for b in unpruned_bars] == [n_i] * L  # this image's N_i, not the reference N
    assert f"N_i = {n_i} vision tokens" in stats and "budget scope scaled: T_i = " + str(t_i) in stats
    assert f"R1 = {r1}, R2 = {r2} (from layer 2)" in stats and f"of {n_i} vision tokens per layer" in stats
    assert f"achieves {sum(expected) / L:.2f}" in status  # 12.00 vs T_i = 11, 20.00 vs 19: whole token counts


def count_from_pixels(overlay, grid):
    cell = cell_size(grid)
    arr = np.asarray(overlay.convert("RGB"))
    centres = [tuple(int(v) for v in arr[r * cell + cell // 2, c * cell + cell // 2]) for r in range(grid) for c in range(grid)]
    return sum(c in (STAGE1_COLOR, DIVERSE_COLOR, STAGE2_COLOR) for c in centres), sum(c == STAGE2_COLOR for c in centres)


def test_overlay_draws_the_kept_base_crop_patches(next_demo, image_files):
    """transformers packs the base crop first (slots 0..P-1 = its patches), so the drawn stage-1 patches are the
    kept slots < P and the stage-2 ones the kept slots < P from layer k on."""
    demo = next_demo[0]
    inner = demo.backend.model.model
    for size in [(64, 48), (40, 120)]:
        sizes = [[size[1], size[0]]]
        assert inner.adapter.packing_maps(inner, sizes)[0][:P].tolist() == list(range(P))
        _, _, overlay, _, _, status, info = ask(demo, image_files[size], budget=20)
        trace = demo.backend.model.last_pruning_trace()
        base1 = {s for s in trace.stage1_index[0].tolist() if 0 <= s < P}
        base2 = {s for s in trace.stage2_index[0].tolist() if 0 <= s < P}
        assert info["marked"]["r1"] == len(base1) and info["marked"]["r2"] == len(base2)
        assert info["marked"]["pruned"] == P - len(base1)
        assert 0 < len(base1) < P  # some base patches kept, some pruned: the overlay shows a real selection
        assert count_from_pixels(overlay, 4) == (len(base1), len(base2))
        # the base crop is the whole image resized to a square (not padded): a kept patch shows that resize
        cell = cell_size(4)
        squashed = np.asarray(Image.open(image_files[size]).convert("RGB").resize((4 * cell, 4 * cell), Image.BICUBIC))
        drawn = np.asarray(overlay.convert("RGB"))
        inside = cell // 5  # inside the cell, off its frame and its centre square
        for patch in base1:
            y, x = (v * cell + inside for v in divmod(patch, 4))
            assert (drawn[y, x] == squashed[y, x]).all()


def test_bad_budgets_are_one_clear_problem(next_demo, image_files):
    """FastV at K=2 of 4 layers sees all N_i tokens in layers 0-1: on the N_i = 88 image the average is at least
    ceil((2 * 88 + 2) / 4) = 45, so T = 41 (absolute: T_i = 41) is infeasible for that image, though feasible at
    the reference N = 80 (R2 = ceil((41 * 4 - 2 * 80) / 2) = 2)."""
    demo = next_demo[0]
    square = image_files[(112, 112)]
    with pytest.raises(InputProblem, match=r"Infeasible budget for fastv on this image \(N_i = 88 .*at least 45"):
        ask(demo, square, method="fastv", budget=41)
    with pytest.raises(InputProblem, match=r"Bad budget .* exceeds the 80 vision tokens"):
        ask(demo, square, budget=N + 1)
    with pytest.raises(InputProblem, match=r"Bad budget .* positive integer, got 0"):
        ask(demo, square, budget=0)
    with pytest.raises(InputProblem, match=r"Unknown budget scope 'per_crop'"):
        ask(demo, square, scope="per_crop")
    assert ask(demo, square, method="fastv", budget=45)[5].startswith("OK")  # R2 = ceil((180 - 176) / 2) = 2


def test_through_the_app(next_demo, image_files):
    """The /ask endpoint of the live app takes the budget scope; errors come back in the status box."""
    demo, client = next_demo
    image = handle_file(image_files[(40, 120)])
    answer, _, overlay, _, stats, status, info = client.predict(image, QUESTION, "learnpruner", 20, 2, False, "scaled",
                                                                api_name="/ask")  # fmt: skip
    assert status.startswith("OK") and answer and info["image_tokens"] == 76 and info["r1"] == 30
    assert count_from_pixels(Image.open(overlay), 4)[0] == info["marked"]["r1"]
    status = client.predict(handle_file(image_files[(112, 112)]), QUESTION, "fastv", 41, 2, False, "absolute",
                            api_name="/ask")[5]  # fmt: skip
    assert status.startswith("Error: Infeasible budget for fastv on this image (N_i = 88")
