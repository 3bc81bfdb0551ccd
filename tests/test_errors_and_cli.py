"""Bad input gets a clear error naming the problem; the CLI prints the documented JSON."""

import json
import re
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
    assert "cannot read image" in cli_error(["--model-path", str(tiny_hf), "--image-file", str(bad), "--query", "q"])


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


# ---------------------------------------------------------------- one clear `error:` line, never a traceback
def cli_error(argv):
    """Run run_llava's CLI entry (``run_main(main)``, what ``python -m llava.eval.run_llava`` runs) -> its error line."""
    from learnpruner_ext.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(run_llava.main, argv)
    message = str(exc.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def broken_lpms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpms")
    LearnablePruningModule(32).save_pretrained(root / "truncated")
    weights = root / "truncated" / "lpm.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    LearnablePruningModule(32).save_pretrained(root / "badconfig")
    (root / "badconfig" / "lpm_config.json").write_text('{"hidden_features": 512}')
    return root


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--pruning-method", "learnpruner", "--visual-token-budget", "0"], "must be a positive integer, got 0"),
        (["--pruning-method", "learnpruner", "--visual-token-budget", "-3"], "must be a positive integer, got -3"),
        (["--pruning-method", "learnpruner", "--visual-token-budget", "6", "--pruning-ratio", "0"], "R1/R2 must be >= 1"),
        (["--pruning-method", "learnpruner", "--visual-token-budget", "6", "--diversity-ratio", "2"], r"lambda must be in \[0, 1\]"),
        (["--visual-token-budget", "6"], "pruning method is 'none'"),  # a budget without a method
        (["--pruning-method", "none", "--visual-token-budget", "6"], "pruning method is 'none'"),
        (["--num_beams", "0"], "--num_beams must be an integer >= 1"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be an integer >= 1"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--query", ""], "the question is empty"),
        (["--query", "  \n "], "the question is empty"),
        (["--query", "<image> <image> two?"], "contains 2 '<image>' tokens"),
    ],
)
def test_cli_errors_are_one_line(tiny_hf, image_file, extra, message):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = ["--model-path", str(tiny_hf), "--image-file", str(image_file), "--query", "What color?", "--max_new_tokens", "2"]
    assert re.search(message, cli_error(argv + extra))


@pytest.mark.parametrize("which,message", [("truncated", r"cannot load LPM weights .*truncated/lpm\.safetensors"),
                                           ("badconfig", r"bad LPM config .*badconfig/lpm_config\.json.*'in_features'")])
def test_corrupt_lpm_names_the_file(tiny_hf, image_file, broken_lpms, which, message):
    argv = ["--model-path", str(tiny_hf), "--image-file", str(image_file), "--query", "q", "--pruning-method",
            "learnpruner", "--visual-token-budget", "6", "--lpm-path", str(broken_lpms / which)]
    assert re.search(message, cli_error(argv))


def test_cli_error_subprocess_has_no_traceback(tiny_hf, image_file):
    out = subprocess.run(
        [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(tiny_hf), "--image-file", str(image_file),
         "--query", "q", "--visual-token-budget", "0", "--pruning-method", "learnpruner"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["error: visual token budget must be a positive integer, got 0; pass e.g. "
                                               "--visual-token-budget 64 (or omit it / use method 'none' for no pruning)"]


@pytest.mark.filterwarnings("ignore:.*UNTRAINED")
def test_achieved_average_is_printed_when_it_differs(tiny_hf, image_file, capsys):
    """16 tokens, 8 layers, k = round(8*12/32) = 3, rho = 3. T=1: R2 = ceil(1*8/(3*3+5)) = 1, R1 = 3, so the
    average is (3*3 + 1*5)/8 = 1.75, not 1. T=6: R2 = ceil(48/14) = 4, R1 = 12 -> (36 + 20)/8 = 7.0. T=7 (vispruner,
    before the LLM) keeps exactly 7: no note."""
    result = run(tiny_hf, image_file, "--pruning-method", "learnpruner", "--visual-token-budget", "1")
    assert result["average_vision_tokens"] == 1.75
    assert "note: learnpruner: requested an average of 1 vision tokens per layer; the plan achieves 1.75 (R1=3, R2=1 from layer 3" in capsys.readouterr().err
    run(tiny_hf, image_file, "--pruning-method", "learnpruner", "--visual-token-budget", "6")
    assert "achieves 7.00" in capsys.readouterr().err
    run(tiny_hf, image_file, "--pruning-method", "vispruner", "--visual-token-budget", "7")
    assert "note:" not in capsys.readouterr().err
