"""Bad input gets a clear error naming the problem; the CLI prints the documented JSON."""

import json
import subprocess
import sys

import pytest
import torch

from learnpruner_ext import BudgetError, LearnablePruningModule, PruningConfig, apply_pruning
from llava.eval import run_llava
from llava.mm_utils import load_image, tokenizer_image_token
from llava.model.builder import load_pretrained_model


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("img") / "img.png"
    images[0].save(path)
    return path


def run(tiny_hf, image_file, *extra):
    argv = ["--model-path", str(tiny_hf), "--image-file", str(image_file), "--query", "What color?", "--json",
            "--max_new_tokens", "3", *extra]  # fmt: skip
    return run_llava.main(argv)


def test_run_llava_json(tiny_hf, image_file, capsys):
    with pytest.warns(UserWarning, match="UNTRAINED"):
        result = run(tiny_hf, image_file, "--pruning-method", "learnpruner", "--visual-token-budget", "6")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))
    for key in ("answer", "method", "budget", "r1", "r2", "vision_tokens_per_layer"):
        assert key in printed
    assert printed["method"] == "learnpruner" and printed["budget"] == 6
    assert len(printed["vision_tokens_per_layer"]) == 8
    assert printed["vision_tokens_per_layer"] == [printed["r1"]] * 3 + [printed["r2"]] * 5


def test_run_llava_loads_trained_lpm_without_warning(tiny_hf, image_file, tmp_path, recwarn):
    lpm = LearnablePruningModule(32)
    lpm.trained = True
    lpm.save_pretrained(tmp_path / "lpm")
    result = run(tiny_hf, image_file, "--pruning-method", "learnpruner", "--visual-token-budget", "6", "--lpm-path", str(tmp_path / "lpm"))
    assert result["r1"] == 12 and not [w for w in recwarn if "UNTRAINED" in str(w.message)]


def test_run_llava_as_subprocess(tiny_hf, image_file):
    out = subprocess.run(
        [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(tiny_hf), "--image-file", str(image_file),
         "--query", "Hi", "--json", "--max_new_tokens", "2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1])["method"] == "none"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--visual-token-budget", "0", "--pruning-method", "learnpruner"], "positive integer"),
        (["--visual-token-budget", "17", "--pruning-method", "learnpruner"], "exceeds the 16 vision tokens"),
        (["--visual-token-budget", "6", "--pruning-method", "learnpruner", "--pruning-layer", "8"], "0 < k < 8"),
        (["--pruning-method", "nope"], "valid methods"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*UNTRAINED")
def test_cli_bad_pruning_args(tiny_hf, image_file, extra, message):
    with pytest.raises((SystemExit, BudgetError, ValueError), match=message):
        run(tiny_hf, image_file, *extra)


def test_missing_and_corrupt_image(tmp_path, tiny_hf):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(SystemExit, match="cannot read image"):
        run_llava.main(["--model-path", str(tiny_hf), "--image-file", str(bad), "--query", "q"])


def test_prompt_image_count(tiny_hf):
    tokenizer, *_ = load_pretrained_model(str(tiny_hf), device="cpu")
    with pytest.raises(ValueError, match="exactly 1 '<image>' token.*found 0"):
        tokenizer_image_token("no image here", tokenizer, expected_images=1)
    with pytest.raises(ValueError, match="found 2"):
        tokenizer_image_token("<image> and <image>", tokenizer, expected_images=1)
    ids = tokenizer_image_token("<image>\nhi", tokenizer, num_image_tokens=5, expected_images=1)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 5 and ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_lpm_width_mismatch(tiny_hf, tmp_path):
    _, model, _, _ = load_pretrained_model(str(tiny_hf), device="cpu")
    LearnablePruningModule(1024).save_pretrained(tmp_path / "lpm")
    with pytest.raises(ValueError, match="1024-d features but this model's vision encoder gives 32-d"):
        apply_pruning(model, PruningConfig("learnpruner", 6, lpm_path=str(tmp_path / "lpm")))
    with pytest.raises(ValueError, match="expects 1024-d"):
        LearnablePruningModule(1024).keep_scores(torch.zeros(1, 4, 32))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_pretrained_model(str(tmp_path))
