"""LPM training on Qwen2.5-VL (issue 17 item 5): ChatML data, the masked training forward with M-RoPE positions,
and the training script end to end on the tiny Qwen.

What the LPM reads on Qwen2.5-VL: the merger's input, ``[M_i, 4 * Dv]`` per image (the adapter's ``features``);
the placeholders hold the merger's output (``full_tokens()``). Positions in training are the unpruned M-RoPE
positions ``get_rope_index`` gives the full prompt, which the inference cut at boundary 0 gathers for the kept
tokens (``position_mode="original"``, the only mode of this family). So the Eq. 6 masked forward must equal both
a physical removal of the dropped tokens at those gathered positions and the real inference path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from script_env import free_port, script_env
import torch

import learnpruner_ext.training.masked_attention as MA
from learnpruner_ext.config import PruningConfig
from learnpruner_ext.lpm import LearnablePruningModule
from learnpruner_ext.methods.base import VisionSelection
from learnpruner_ext.methods.oracle import FixedIndexOracle
from learnpruner_ext.modeling import apply_pruning
from learnpruner_ext.tiny import build_tiny_qwen_model, random_image
from learnpruner_ext.training import LPMTrainingModel
from llava.inference import build_prompt
from llava.mm_utils import image_inputs, tokenizer_image_token

REPO = Path(__file__).resolve().parents[2]
SIZES = [(56, 56), (112, 84), (84, 56)]  # (w, h) -> merged grids 2x2, 3x4, 2x3
EXPECTED_N = [4, 12, 6]  # N_i = t*h*w / 4 of each image's image_grid_thw
KEPT = 3  # vision tokens each image keeps in the masked-forward checks (< min N_i, so stage 1 prunes every image)
PREFIX, SUFFIX = 3, 5  # text tokens before / after the placeholders
TOL = 1e-5  # fp32


# -- the data pipeline ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen") / "qwen"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "learnpruner_ext.tiny", "--family", "qwen2_5_vl", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def qwen_data(make_dataset, tmp_path_factory) -> Path:
    """conftest's toy data: images of 56x56, 80x56 and 56x72 px, i.e. N_i = 4 or 6 under Qwen2-VL's resize."""
    return make_dataset(tmp_path_factory.mktemp("qdata"), num_samples=12)


@pytest.fixture(scope="module")
def qwen_dataset(tiny_qwen_dir, qwen_data):
    from llava.model.builder import load_pretrained_model
    from llava.train.data import LazySupervisedDataset

    tokenizer, vlm, processor, _ = load_pretrained_model(str(tiny_qwen_dir), None, device="cpu", dtype="float32")
    dataset = LazySupervisedDataset(
        qwen_data, tokenizer, processor, num_image_tokens=vlm.num_vision_tokens,
        image_token_id=vlm.config.image_token_id, image_folder=qwen_data.parent / "images", conv_mode="qwen2_5_vl",
        model_config=vlm.config, image_token_counts=vlm.image_token_counts,
    )  # fmt: skip
    return dataset, tokenizer, vlm


def _runs(tokens: list[str]) -> list[tuple[str, int]]:
    """Run-length encoding of a token list: [(token, repeats), ...]."""
    out = []
    for t in tokens:
        if out and out[-1][0] == t:
            out[-1] = (t, out[-1][1] + 1)
        else:
            out.append((t, 1))
    return out


def test_chatml_prompt_placeholders_and_assistant_only_labels(qwen_dataset):
    """One two-turn sample decoded by hand: the prompt is the inference prompt (ChatML, the image wrapped in
    <|vision_start|> <|image_pad|> x N_i <|vision_end|>), and exactly each answer plus its <|im_end|> is supervised."""
    dataset, tokenizer, vlm = qwen_dataset
    index = next(i for i, e in enumerate(dataset.entries) if "image" in e and len(e["conversations"]) == 4)
    entry, item = dataset.entries[index], dataset[index]
    grid = item["image_grid_thw"]
    n = int(grid.prod()) // 4
    assert n in (4, 6) and item["pixel_values"].shape == (int(grid.prod()), 1176)
    tokens = tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    runs = _runs(tokens)
    at = runs.index(("<|image_pad|>", n))
    assert runs[at - 1] == ("<|vision_start|>", 1) and runs[at + 1] == ("<|vision_end|>", 1)
    assert tokens.count("<|image_pad|>") == n and item["input_ids"].tolist().count(vlm.config.image_token_id) == n
    # the first question's tokens are exactly what inference feeds the model for it
    question = entry["conversations"][0]["value"].replace("<image>", "").strip()
    prompt = tokenizer_image_token(build_prompt(question, "qwen2_5_vl"), tokenizer, vlm.config.image_token_id,
                                   num_image_tokens=n)  # fmt: skip
    assert item["input_ids"][: len(prompt)].tolist() == prompt
    # labels: the supervised tokens, grouped into runs, decode to "<answer><|im_end|>" for each assistant turn
    labels = item["labels"]
    supervised = (labels != -100).tolist()
    assert torch.equal(labels[labels != -100], item["input_ids"][labels != -100])
    groups, current = [], []
    for tok_id, sup in zip(item["input_ids"].tolist(), supervised):
        if sup:
            current.append(tok_id)
        elif current:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    answers = [t["value"] for t in entry["conversations"] if t["from"] == "gpt"]
    assert [tokenizer.decode(g) for g in groups] == [f"{a}<|im_end|>" for a in answers]
    first = supervised.index(True)
    assert first == len(prompt)  # system, user turn and the assistant header are never supervised
    assert tokenizer.decode(item["input_ids"][:first]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    after = [i + 1 for i in range(len(supervised) - 1) if supervised[i] and not supervised[i + 1]]
    assert [tokens[i] for i in after] == ["\n"] * len(answers)  # the newline after each <|im_end|> is not


def test_collator_concatenates_patches_and_stacks_grids(qwen_dataset):
    """Items of two image sizes and a text-only one -> pixel_values [Σ P_i, 1176], image_grid_thw [B_img, 3]."""
    from llava.train.data import DataCollatorForSupervisedDataset

    dataset, tokenizer, vlm = qwen_dataset
    with_image = [i for i, e in enumerate(dataset.entries) if "image" in e]
    by_n = {}
    for i in with_image:
        by_n.setdefault(int(dataset[i]["image_grid_thw"].prod()) // 4, i)
    assert sorted(by_n) == [4, 6]  # two sizes, so N_i differs within the batch
    text = next(i for i, e in enumerate(dataset.entries) if "image" not in e)
    items = [dataset[by_n[4]], dataset[text], dataset[by_n[6]]]
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    assert batch["image_grid_thw"].tolist() == [items[0]["image_grid_thw"].tolist(), items[2]["image_grid_thw"].tolist()]
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    counts = vlm.image_token_counts(batch["image_grid_thw"])
    assert counts == [4, 6] and (batch["input_ids"] == vlm.config.image_token_id).sum(-1).tolist() == [4, 0, 6]


# -- the masked training forward ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen():
    model, tokenizer, processor = build_tiny_qwen_model(seed=0)
    model.eval()
    images = [random_image(i, s) for i, s in enumerate(SIZES)]
    inputs = image_inputs(images, processor, model.config)
    counts = model.image_token_counts(inputs["image_grid_thw"])
    assert counts == EXPECTED_N
    width = PREFIX + max(counts) + SUFFIX
    g = torch.Generator().manual_seed(3)
    ids = torch.full((len(SIZES), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    for b, n in enumerate(counts):  # right-padded, as the training collator does
        text = torch.randint(5, 400, (PREFIX + SUFFIX,), generator=g)
        row = torch.cat([text[:PREFIX], torch.full((n,), model.config.image_token_id), text[PREFIX:]])
        ids[b, : len(row)], attention_mask[b, : len(row)] = row, 1
    labels = ids.masked_fill(ids == model.config.image_token_id, -100).masked_fill(attention_mask == 0, -100)
    return model, ids, attention_mask, labels, inputs, counts


class FixedLPM(LearnablePruningModule):
    """An LPM whose hard keep is a fixed random pattern of KEPT ones per image (STE through a real LPM's
    probabilities); the first candidate is always dropped."""

    def __init__(self, dim, seed=1):
        super().__init__(dim, 16)
        self.gen = torch.Generator().manual_seed(seed)
        self.kept = {}  # M_i -> kept candidate indices (each test image has its own M_i)

    def keep_mask(self, features):
        soft = super().keep_mask(features)
        hard = torch.zeros_like(soft)
        for j in range(soft.shape[0]):
            chosen = (torch.randperm(soft.shape[-1] - 1, generator=self.gen)[:KEPT] + 1).sort().values
            hard[j, chosen] = 1
            self.kept[soft.shape[-1]] = chosen
        return hard + soft - soft.detach()


class KeptSlotsOracle(FixedIndexOracle):
    """Inference's vision stage keeping exactly the slots the FixedLPM kept (looked up by the image's M_i)."""

    def __init__(self, method, kept):
        super().__init__(method)
        self.kept = kept

    def select_vision(self, ctx):
        index = self.kept[ctx.features.shape[1]].to(ctx.features.device)
        return VisionSelection(index=index.expand(ctx.features.shape[0], -1))


def _masked_forward(model, ids, attention_mask, labels, inputs):
    """-> (training outputs, last hidden states of the Eq. 6 forward [B, S, D], the FixedLPM, the wrapper)."""
    lpm = FixedLPM(model.config.vision_config.hidden_size * 4)
    wrapper = LPMTrainingModel(model, lpm, prune_loss_weight=1.0)
    captured = {}
    hook = model.model.language_model.register_forward_hook(lambda m, a, out: captured.update(h=out.last_hidden_state.detach()))
    try:
        out = wrapper(ids, attention_mask, labels, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    finally:
        hook.remove()
    return out, captured["h"], lpm, wrapper


def test_masked_forward_equals_physical_removal_with_mrope(tiny_qwen):
    """Eq. 6 with a 0/1 mask (fp32) = the dropped tokens removed, at the M-RoPE positions get_rope_index gives the
    full prompt (gathered for the kept tokens); loss, per-token hidden states and Eq. 7's terms; gradients reach
    the LPM only."""
    model, ids, attention_mask, labels, inputs, counts = tiny_qwen
    out, masked_hidden, lpm, wrapper = _masked_forward(model, ids, attention_mask, labels, inputs)
    try:
        assert wrapper.position_mode == "original"
        inner = model.model
        with torch.no_grad():
            MA.restore_attention(model, wrapper.previous_attn_implementation)  # the reference runs on sdpa
            token_type = (ids == model.config.image_token_id).int()
            positions = inner.get_rope_index(ids, token_type, image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=attention_mask)[0]  # [3, B, S] fmt: skip
            groups = inner.adapter.image_groups(inner, inputs["pixel_values"], inputs["image_grid_thw"])
            full = {g.images[0]: g.full_tokens()[0] for g in groups}
            assert [g.features.shape[-1] for g in groups] == [4 * model.config.vision_config.hidden_size] * 3
            embed = inner.get_input_embeddings()
            total, count, worst = 0.0, 0, 0.0
            for b, n in enumerate(counts):
                length = int(attention_mask[b].sum())
                kept = lpm.kept[n]
                columns = torch.cat([torch.arange(PREFIX), PREFIX + kept, torch.arange(PREFIX + n, length)])
                reduced = torch.cat([embed(ids[b, :PREFIX]), full[b][kept], embed(ids[b, PREFIX + n : length])])[None]
                # M-RoPE gaps: text after the image keeps its unpruned position, so the kept rows are not 0..len-1
                assert positions[0, b, PREFIX + n] == PREFIX + max(SIZES[b]) // 28
                hidden = inner.language_model(inputs_embeds=reduced, position_ids=positions[:, b : b + 1, columns]
                                              ).last_hidden_state[0]  # fmt: skip
                worst = max(worst, float((hidden - masked_hidden[b, columns]).abs().max()))
                targets = labels[b, columns][1:]
                total += float(torch.nn.functional.cross_entropy(
                    model.lm_head(hidden[:-1][targets != -100]), targets[targets != -100], reduction="sum"))  # fmt: skip
                count += int((targets != -100).sum())
            assert worst <= TOL, worst
            assert float(out["ntp_loss"]) == pytest.approx(total / count, abs=TOL)
            shares = [KEPT / n for n in counts]  # Eq. 7 per image over its M_i = N_i candidates, then averaged
            assert float(out["prune_loss"]) == pytest.approx(sum(s**2 for s in shares) / len(shares), abs=1e-7)
            assert float(out["kept_ratio"]) == pytest.approx(KEPT * len(counts) / sum(counts), abs=1e-7)
            assert out["num_images"] == len(counts)
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lpm.parameters())
        assert wrapper.frozen_parameters_with_grad() == []
    finally:
        MA.restore_attention(model, wrapper.previous_attn_implementation)


def test_masked_forward_equals_the_inference_cut(tiny_qwen):
    """The same hard mask as inference's vision stage (boundary-0 cut, original M-RoPE positions, sdpa): every kept
    token's hidden state agrees with the Eq. 6 forward on the full sequence (fp32, <= 1e-5)."""
    model, ids, attention_mask, labels, inputs, counts = tiny_qwen
    _, masked_hidden, lpm, wrapper = _masked_forward(model, ids, attention_mask, labels, inputs)
    MA.restore_attention(model, wrapper.previous_attn_implementation)
    method = apply_pruning(model, PruningConfig(method="random", budget=KEPT, position_mode="original"))
    try:
        model.model.set_pruner(KeptSlotsOracle(method, lpm.kept))
        with torch.no_grad():
            pruned = model.model(input_ids=ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                                 image_grid_thw=inputs["image_grid_thw"]).last_hidden_state  # fmt: skip
        trace = model.last_pruning_trace()
        assert [p["r1"] for p in trace.image_plans] == [KEPT] * len(counts)
        worst = 0.0
        for b, n in enumerate(counts):
            keep = attention_mask[b].bool() & (ids[b] != model.config.image_token_id)
            keep[PREFIX + lpm.kept[n]] = True
            reference = masked_hidden[b, keep]
            worst = max(worst, float((pruned[b, -len(reference) :] - reference).abs().max()))  # re-left-padded
        assert worst <= TOL, worst
    finally:
        model.model.set_pruner(None)


def test_masked_forward_differs_from_contiguous_positions(tiny_qwen):
    """The check above can fail: numbering the kept tokens contiguously (LLaVA's default) changes the hidden
    states of the text after the image on this M-RoPE family."""
    model, ids, attention_mask, labels, inputs, counts = tiny_qwen
    _, masked_hidden, lpm, wrapper = _masked_forward(model, ids, attention_mask, labels, inputs)
    MA.restore_attention(model, wrapper.previous_attn_implementation)
    inner = model.model
    with torch.no_grad():
        groups = inner.adapter.image_groups(inner, inputs["pixel_values"], inputs["image_grid_thw"])
        full = {g.images[0]: g.full_tokens()[0] for g in groups}
        b, n = 1, counts[1]
        length = int(attention_mask[b].sum())
        kept = lpm.kept[n]
        embed = inner.get_input_embeddings()
        reduced = torch.cat([embed(ids[b, :PREFIX]), full[b][kept], embed(ids[b, PREFIX + n : length])])[None]
        hidden = inner.language_model(inputs_embeds=reduced).last_hidden_state[0]  # positions 0..len-1
        columns = torch.cat([torch.arange(PREFIX), PREFIX + kept, torch.arange(PREFIX + n, length)])
        assert float((hidden - masked_hidden[b, columns]).abs().max()) > 1e-3


# -- the training script end to end ------------------------------------------------------------------------------


def _finetune(base, data, out, max_steps, log: Path) -> str:
    """scripts/v1_5/finetune_lpm.sh with a Qwen base (its template picked from config.json), shrunk to a CPU run."""
    env = script_env(
        NUM_GPUS="1", GLOBAL_BATCH="4", PER_DEVICE_BATCH="4", DATA=str(data), IMAGES=str(data.parent / "images"),
        DATA_FRACTION="1.0", LR="1e-2", LAUNCHER="torchrun", MASTER_PORT=str(free_port()),
        EXTRA_ARGS=f"--use_cpu True --max_steps {max_steps} --save_steps 2 --lpm_hidden 32 --dataloader_num_workers 0",
    )  # fmt: skip
    proc = subprocess.run(["bash", "scripts/v1_5/finetune_lpm.sh", str(base), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def test_finetune_script_resumes_and_run_llava_uses_the_lpm(tiny_qwen_dir, qwen_data, tmp_path):
    """finetune_lpm.sh on the tiny Qwen stops at step 2 (checkpoint-2), the same command resumes to 4 without
    repeating steps, and run_llava --pruning-method learnpruner --lpm-path answers with the trained LPM."""
    out = tmp_path / "lpm"
    first = _finetune(tiny_qwen_dir, qwen_data, out, 2, tmp_path / "first.log")
    checkpoint = out / "checkpoint-2"
    config = json.loads((checkpoint / "lpm_config.json").read_text())
    assert config["trained"] is True and config["step"] == 2 and config["conv_version"] == "qwen2_5_vl"
    assert config["in_features"] == 4 * 32  # the merger's input: 4 patches of the tiny ViT's 32-d features
    assert len(re.findall(r"'ntp_loss'", first)) == 2 and "'kept_ratio'" in first

    second = _finetune(tiny_qwen_dir, qwen_data, out, 4, tmp_path / "second.log")
    assert "resuming from" in second and "checkpoint-2" in second
    assert len(re.findall(r"'ntp_loss'", second)) == 2  # steps 3 and 4 only
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    trained, after_two = LearnablePruningModule.from_pretrained(out), LearnablePruningModule.from_pretrained(checkpoint)
    assert trained.trained and not torch.equal(trained.fc1.weight, after_two.fc1.weight)

    image = next((qwen_data.parent / "images" / "coco").glob("*.png"))
    cmd = [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(tiny_qwen_dir), "--image-file", str(image),
           "--query", "What color is the object?", "--conv-mode", "qwen2_5_vl", "--position-mode", "original",
           "--pruning-method", "learnpruner", "--visual-token-budget", "2", "--lpm-path", str(out),
           "--max_new_tokens", "3", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["method"] == "learnpruner" and isinstance(result["answer"], str) and "UNTRAINED" not in proc.stderr
    assert result["image_plans"][0]["r1"] < result["image_tokens"][0]  # the LPM's stage 1 pruned this image


def test_a_qwen_base_refuses_another_template(tiny_qwen_dir, qwen_data, tmp_path):
    """--version v1 (vicuna) on a Qwen2.5-VL base is one clear error naming the flag and the template to use."""
    from llava.train.train_lpm import build, parse_args

    argv = ["--model_name_or_path", str(tiny_qwen_dir), "--data_path", str(qwen_data), "--image_folder",
            str(qwen_data.parent / "images"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
            "--report_to", "none", "--version", "v1"]  # fmt: skip
    with pytest.raises(ValueError, match=r"needs --version qwen2_5_vl .*got 'v1'"):
        build(*parse_args(argv))
