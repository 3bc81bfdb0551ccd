"""Attention stability (issue 21 item 1): rank statistics by hand, and the recorded stage-2 scores equal a direct
eager computation on the physically reduced sequence."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from learnpruner_ext.analysis.attention_stability import kendall_tau_b, prompt_stability, spearman, top_overlap
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

pytestmark = pytest.mark.usefixtures("no_grad")
QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?"]


def test_rank_statistics_by_hand():
    """a = 1,2,3,4 and b = 1,3,2,4: one discordant pair of 6, tau = (5 - 1)/6 = 2/3; rank differences d = 0,1,1,0,
    rho = 1 - 6*2/(4*15) = 0.8. Ties: a = 1,1,2 vs b = 1,2,3: tau-b = 2/sqrt(2*3) = 0.8165 (pairs (0,2),(1,2)
    concordant, (0,1) tied in a). Top-2 overlap of (4,3,2,1) and (4,1,3,2): {0,1} vs {0,2} -> 1/2."""
    a, b = torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])
    assert kendall_tau_b(a, b) == pytest.approx(2 / 3) and spearman(a, b) == pytest.approx(0.8)
    assert spearman(a, -a) == pytest.approx(-1.0) and kendall_tau_b(a, a) == pytest.approx(1.0)
    assert kendall_tau_b(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(2 / 6**0.5)
    assert top_overlap(torch.tensor([4.0, 3, 2, 1]), torch.tensor([4.0, 1, 3, 2]), 2) == 0.5


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor


def _batch(loaded, images):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images[:2], [build_prompt(q) for q in QUESTIONS])


@pytest.mark.parametrize("stage1", ["none", "cls"])
def test_a_stage1_that_keeps_everything_is_perfectly_stable(loaded, images, stage1):
    """T = 15 of 16 gives R1 = 16 (LearnPruner's mapping caps R1 at N): a separate pruned run that keeps every
    token scores exactly as the full run (1.0); stage1=none is the full run itself."""
    _, model, _ = loaded
    for row in prompt_stability(model, _batch(loaded, images), stage1, 15, layer=3):
        assert row.r1 == 16 and (row.spearman, row.kendall, row.overlap) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)


@pytest.mark.parametrize("stage1", ["cls", "random"])
def test_recorded_scores_equal_eager_attention_on_the_reduced_sequence(loaded, images, tiny_hf, stage1):
    """The pruned run's stage-2 scores (exact rows) = eager attention of layer 3 on the physically reduced prompt
    (text + stage 1's kept tokens, contiguous positions): instruction rows -> vision columns, mean over heads/rows."""
    tokenizer, model, processor = loaded
    batch = _batch(loaded, images)
    rows = prompt_stability(model, batch, stage1, 6, layer=3)
    trace = model.last_pruning_trace()
    assert all(-1.0 <= r.spearman <= 1.0 for r in rows) and rows[0].r1 < 16
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float32, attn_implementation="eager").eval()
    image_id = model.config.image_token_id
    for b in range(2):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()][None]
        vision = ids[0] == image_id
        first, kept = int(vision.nonzero()[0]), trace.stage1_index[b][trace.stage1_index[b] >= 0]
        pixel = batch["pixel_values"][b : b + 1]
        feats = eager.model.vision_tower(pixel, output_hidden_states=True).hidden_states[-2][:, 1:]
        tokens = eager.model.multi_modal_projector(feats[0, kept])
        reduced = torch.cat([ids[:, : first + len(kept)], ids[:, first + 16 :]], dim=1)
        embeds = eager.get_input_embeddings()(reduced).clone()
        embeds[0, first : first + len(kept)] = tokens
        out = eager.model.language_model(inputs_embeds=embeds, output_attentions=True)
        attn = out.attentions[3][0].mean(0)  # [S, S], heads averaged
        start = first + len(kept)  # the instruction rows: every position after the last vision token
        expected = attn[start:, first:start].mean(0)
        assert torch.allclose(trace.stage2_scores[b][: len(kept)], expected, atol=1e-5)
        # the full sequence: the unpruned prompt, eager, same rows -> the statistics computed directly
        full = eager(input_ids=ids, pixel_values=pixel, output_attentions=True).attentions[3][0].mean(0)
        reference = full[first + 16 :, first : first + 16].mean(0)[kept]
        assert rows[b].spearman == pytest.approx(spearman(reference, expected), abs=1e-4)
        assert rows[b].kendall == pytest.approx(kendall_tau_b(reference, expected), abs=1e-4)
        assert rows[b].overlap == top_overlap(reference, expected, rows[b].r2)


def test_cli_table_json_and_plot(tiny_hf, images, tmp_path, capsys):
    from llava.eval import attention_stability as cli

    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(f'{{"question_id": {i}, "image": "{i}.png", "text": "{q}"}}\n'
                                 for i, q in enumerate(QUESTIONS + ["Is there a red square?"])))  # fmt: skip
    out = tmp_path / "out"
    summary = cli.main(["--model-path", str(tiny_hf), "--question-file", str(questions), "--image-folder", str(tmp_path),
                        "--budget", "6", "--layers", "2,3", "--stage1", "cls,none", "--batch-size", "2",
                        "--device", "cpu", "--dtype", "float32", "--out", str(out), "--no-progress"])  # fmt: skip
    assert [(s["stage1"], s["layer"]) for s in summary] == [("cls", 2), ("cls", 3), ("none", 2), ("none", 3)]
    assert all(s["prompts"] == 3 for s in summary)
    assert [s["spearman"] for s in summary if s["stage1"] == "none"] == [pytest.approx(1.0)] * 2
    assert (out / "stability.png").stat().st_size > 0
    data = __import__("json").loads((out / "stability.json").read_text())
    assert len(data["prompts"]) == 12 and "| cls | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--stage1 \\['lmp'\\] unknown"):
        from learnpruner_ext.cli import run_main

        run_main(cli.main, ["--question-file", str(questions), "--image-folder", str(tmp_path), "--budget", "6",
                            "--stage1", "lmp"])  # fmt: skip
