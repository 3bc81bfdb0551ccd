"""Eval entry points on a tiny random LLaVA-NeXT (issue 16 item 4): run_llava answers and records the budget scope
and per-image accounting; the visualize CLI refuses NeXT with one clear error (overlays draw one square grid)."""

import json

import pytest

from learnpruner_ext.tiny import random_image, save_tiny_checkpoint
from llava.eval import run_llava
from llava.serve import visualize


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("next_eval")
    path = save_tiny_checkpoint(root / "model", family="llava_next", seed=0)
    image = root / "img.png"
    random_image(1, (64, 48)).save(image)  # 3 crops -> N_i = 44 of the reference N = 80 (tests/test_llava_next.py)
    return str(path), str(image)


@pytest.mark.parametrize("scope,expected_r1", [("scaled", 44), ("absolute", 44)])
def test_run_llava_next_records_scope(next_ckpt, capsys, scope, expected_r1):
    path, image = next_ckpt
    run_llava.main(["--model-path", path, "--image-file", image, "--query", "What color?", "--json",
                    "--pruning-method", "learnpruner", "--visual-token-budget", "60", "--budget-scope", scope,
                    "--max_new_tokens", "2"])  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["budget_scope"] == scope
    assert out["image_tokens"] == [44]
    assert isinstance(out["answer"], str) and out["answer"]
    # scaled: T_i = round(60 * 44 / 80) = 33 average = (44*2 + 22*2)/4; absolute: min(60, 44) = 44 keeps all
    assert out["average_vision_tokens"] == (33.0 if scope == "scaled" else 44.0)


def test_visualize_refuses_next(next_ckpt, tmp_path):
    path, image = next_ckpt
    with pytest.raises(SystemExit, match="one square grid.*llava_next"):
        visualize.main(["--model-path", path, "--image-file", image, "--query", "q", "--methods", "learnpruner",
                        "--budget", "60", "--out", str(tmp_path / "v.png")])  # fmt: skip


def test_vqa_loader_next_identity_records_scope_and_refuses_mixed(next_ckpt, tmp_path):
    from llava.eval import model_vqa_loader

    path, image = next_ckpt
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": "img.png", "text": t}) + "\n"
                         for i, t in enumerate(["What color?", "How many?"])))  # fmt: skip
    answers = tmp_path / "a.jsonl"
    base = ["--model-path", path, "--question-file", str(q), "--image-folder", str(tmp_path.parent / "x"),
            "--answers-file", str(answers), "--pruning-method", "learnpruner", "--visual-token-budget", "60",
            "--max_new_tokens", "2", "--no-progress"]  # fmt: skip
    import shutil
    (tmp_path.parent / "x").mkdir(exist_ok=True)
    shutil.copy(image, tmp_path.parent / "x" / "img.png")
    model_vqa_loader.main(base + ["--budget-scope", "scaled"])
    recs = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(recs) == 2
    assert all(r["metadata"]["settings"]["pruning"]["budget_scope"] == "scaled" for r in recs)
    from llava.eval.answer_loop import InputError

    with pytest.raises(InputError, match="pruning.budget_scope: file 'scaled' vs now 'absolute'"):
        model_vqa_loader.main(base + ["--budget-scope", "absolute"])
