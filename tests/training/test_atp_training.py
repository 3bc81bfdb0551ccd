"""ATP training forward (learnpruner_ext.training.atp_model) against inference's physical removal (the ``atp``
method), on the tiny random LLaVA (16 vision tokens on a 4 x 4 grid, 8 layers: modules before layers 1, 4, 6)."""

import math

import pytest
import torch

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.atp import ATPModules
from learnpruner_ext.training.atp_model import ATPTrainingModel
from llava.inference import build_prompt, prepare_batch
from llava.model.builder import load_pretrained_model

N, DEPTH, LAYERS = 16, 8, (1, 4, 6)
QUESTION = "How many shapes are there in this picture?"
ANSWER = [301, 77, 415, 2]  # 4 answer tokens (tiny vocabulary of 512), teacher-forced


@pytest.fixture(scope="module")
def models(tiny_hf):
    tokenizer, infer, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    _, base, _, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    return tokenizer, infer, processor, base


def constant_thresholds(modules, values):
    """Module k's thresholds become the constants values[k] = (theta_r, theta_s): zero head weights, biases at the
    logits; the projection keeps its random weights, so the thresholds' input is still computed (and compared)."""
    for k, (theta_r, theta_s) in values.items():
        for head, theta in ((modules[k].head_r, theta_r), (modules[k].head_s, theta_s)):
            head.weight.data.zero_()
            head.bias.data.fill_(math.log(theta / (1 - theta)))


def record_inference(method):
    """Wrap the method: per module layer, its inputs and the threshold-input vector (the ``proj`` input)."""
    log = {}
    inputs_of = method.module_inputs

    def module_inputs(ctx):
        out = inputs_of(ctx)
        log[ctx.stage_layer] = {key: value.clone() for key, value in out.items()}
        return out

    method.module_inputs = module_inputs
    hooks = [method.atp[k].proj.register_forward_hook(lambda mod, args, out, k=k: log[k].__setitem__("x", args[0]))
             for k in LAYERS]  # fmt: skip
    return log, hooks


def sequence(models, images):
    tokenizer, infer, processor, _ = models
    batch = prepare_batch(infer, tokenizer, processor, images[:1], [build_prompt(QUESTION)])
    prompt = batch["input_ids"]
    full = torch.cat([prompt, torch.tensor([ANSWER])], 1)
    labels = torch.cat([torch.full_like(prompt, -100), torch.tensor([ANSWER])], 1)
    return batch, {"input_ids": full, "attention_mask": torch.ones_like(full), "labels": labels,
                   "pixel_values": batch["pixel_values"]}  # fmt: skip


def calibrate(models, images, tmp_path, score_norm="none"):
    """Random ATP modules with constant thresholds theta_r midway in the widest gap of the S_r values near their
    median at each module (found module by module on inference), theta_s = 0.7 (keeps the stride-4 patch only);
    saved as trained modules at a huge temperature, so the training masks are exactly 0 or 1."""
    tokenizer, infer, processor, _ = models
    torch.manual_seed(3)
    modules = ATPModules(LAYERS, N, hidden_features=8, temperature=1e7, num_layers=DEPTH, self_score="attention",
                         score_norm=score_norm)  # fmt: skip
    modules.trained = True
    values = {k: (1e-6, 1e-6) for k in LAYERS}  # keep everything while calibrating
    batch, _ = sequence(models, images)
    for k in LAYERS:
        constant_thresholds(modules, values)
        modules.save_pretrained(tmp_path / "atp")
        method = apply_pruning(infer, PruningConfig("atp", 8, atp_path=str(tmp_path / "atp")))
        log, _ = record_inference(method)
        with torch.no_grad():
            infer(**batch)
        s_r = ((log[k]["s_self"] + log[k]["s_cross"]) / 2)[0]
        s_r = (s_r / s_r.max() if score_norm == "max" else s_r).sort().values
        mid = len(s_r) // 2
        gaps = [(float(s_r[i + 1] - s_r[i]), i) for i in range(max(mid - 3, 0), min(mid + 3, len(s_r) - 1))]
        gap, i = max(gaps)
        assert gap > 1e-4, gap
        values[k] = (float(s_r[i] + s_r[i + 1]) / 2, 0.7)
    constant_thresholds(modules, values)
    modules.save_pretrained(tmp_path / "atp")
    return modules


@pytest.mark.parametrize("score_norm", ["none", "max"])
def test_masked_forward_equals_physical_removal(models, images, tmp_path, score_norm):
    """With 0/1 masks (S_redundant as it is, or divided by its maximum over the tokens present), the training forward equals inference: per module the scores S_self and S_cross of the
    tokens present and the thresholds' width-2N input (<= 1e-5), the kept set, and the logits at every text
    position of the prompt and at the 4 teacher-forced answer steps (prefill + 3 decode steps, <= 1e-5)."""
    tokenizer, infer, processor, base = models
    modules = calibrate(models, images, tmp_path, score_norm)
    batch, train_batch = sequence(models, images)
    method = apply_pruning(infer, PruningConfig("atp", 8, atp_path=str(tmp_path / "atp")))
    log, _ = record_inference(method)
    steps = len(ANSWER)
    forced = lambda batch_id, ids: [ANSWER[ids.shape[0] - batch["input_ids"].shape[1]]]  # noqa: E731
    with torch.no_grad():
        out = infer.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             prefix_allowed_tokens_fn=forced, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        prefill = infer(**batch).logits[0]
    trace = infer.last_pruning_trace()
    assert out.sequences[0, -steps:].tolist() == ANSWER
    infer_steps = torch.stack(out.logits, 1)[0]  # [steps, V]

    train = ATPTrainingModel(base, ATPModules.from_pretrained(tmp_path / "atp"), lambda_atp=0.05, lambda_target=0.2,
                             target_tokens=8)  # fmt: skip
    seen = {}
    hooks = [train.atp[k].proj.register_forward_hook(lambda mod, args, o, k=k: seen.__setitem__(k, args[0]))
             for k in LAYERS]  # fmt: skip
    scores = {}
    import learnpruner_ext.training.atp_model as atp_model

    original = atp_model.masked_atp_scores

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        scores[len(scores)] = result
        return result

    atp_model.masked_atp_scores = spy
    try:
        with torch.no_grad():
            result = train.decode(**{k: v for k, v in train_batch.items()})
    finally:
        atp_model.masked_atp_scores = original
        for h in hooks:
            h.remove()
    masks = result["masks"]
    prompt_len = batch["input_ids"].shape[1]
    vision = (batch["input_ids"][0] == infer.config.image_token_id).nonzero()[:, 0]
    kept_counts = []
    for j, k in enumerate(LAYERS):
        m = masks[k][0]
        assert bool(((m == 0) | (m == 1)).all()), m  # saturated: the equivalence holds exactly
        present = (masks[LAYERS[j - 1]][0] if j else torch.ones(N)) > 0.5
        s_self, s_cross = scores[j]
        assert (s_self[0][present] - log[k]["s_self"][0]).abs().max() <= 1e-5
        assert (s_cross[0][present] - log[k]["s_cross"][0]).abs().max() <= 1e-5
        assert (seen[k] - log[k]["x"]).abs().max() <= 1e-5  # zeros at the pruned slots, scores at the present ones
        kept_counts.append(int(m.sum()))
    assert len(set(kept_counts)) > 1 and 0 < kept_counts[-1] < N, kept_counts
    per_layer = [N] * LAYERS[0] + sum(([c] * (e - k) for c, k, e in zip(kept_counts, LAYERS, LAYERS[1:] + (DEPTH,))), [])
    assert trace.vision_tokens_per_sample[0] == per_layer
    assert float(train.average_tokens(masks)[0]) == pytest.approx(sum(per_layer) / DEPTH)

    logits = base.lm_head(result["hidden"])[0]  # [S, V] training positions
    after = prompt_len - int(vision[-1]) - 1  # text after the image: the last `after` positions of the prefill
    prefix = int(vision[0])
    assert (logits[:prefix] - prefill[:prefix]).abs().max() <= 1e-5
    assert (logits[prompt_len - after : prompt_len] - prefill[-after:]).abs().max() <= 1e-5
    assert (logits[prompt_len - 1 : prompt_len - 1 + steps] - infer_steps).abs().max() <= 1e-5
    train.vlm.set_attn_implementation({"text_config": train.previous_attn_implementation})


def test_gradients_reach_both_threshold_heads_and_only_them(models, images):
    """At the default temperature (T = 100) the soft masks are strictly inside (0, 1) near the thresholds: one
    backward gives nonzero gradients to both heads (theta_r, theta_s) and to the projection of every module, and
    none to the frozen VLM; the loss is L_ntp + 0.05 L_ATP + 0.2 |N̄ - 8| with L_ATP = Σ_k mean(ΣM_k / N)·k."""
    _, _, _, base = models
    torch.manual_seed(0)
    modules = ATPModules(LAYERS, N, hidden_features=8, num_layers=DEPTH, self_score="attention")
    constant_thresholds(modules, {k: (0.02, 0.7) for k in LAYERS})  # S_r ~ 1/S: near 0.02; S_s 0.8125 and 2/3 near 0.7
    for k in LAYERS:  # small random head weights: the thresholds depend on the input again
        for head in (modules[k].head_r, modules[k].head_s):
            head.weight.data.normal_(0, 0.01)
    _, train_batch = sequence(models, images)
    train = ATPTrainingModel(base, modules, lambda_atp=0.05, lambda_target=0.2, target_tokens=8)
    try:
        out = train(**train_batch)
        out["loss"].backward()
        masks = train.decode(**train_batch)["masks"]
        atp_loss, target, mean_tokens = train.budget_losses(masks)
        by_hand = sum(float(masks[k].detach().sum()) / N * k for k in LAYERS)
        assert float(atp_loss.detach()) == pytest.approx(by_hand, rel=1e-5)
        assert float(target.detach()) == pytest.approx(abs(float(mean_tokens.detach()) - 8), rel=1e-5)
        assert float(out["loss"]) == pytest.approx(float(out["ntp_loss"]) + 0.05 * by_hand + 0.2 * float(target), rel=1e-5)
        for k in LAYERS:
            for name in ("head_r", "head_s", "proj"):
                grad = getattr(modules[k], name).weight.grad
                assert grad is not None and float(grad.abs().sum()) > 0, (k, name)
        assert train.frozen_parameters_with_grad() == []
        assert sorted(train.trained_parameters()) == sorted(f"atp.{n}" for n, _ in modules.named_parameters())
    finally:
        train.vlm.set_attn_implementation({"text_config": train.previous_attn_implementation})


def test_bad_objective_is_refused(models):
    _, _, _, base = models
    modules = ATPModules(LAYERS, N, num_layers=DEPTH)
    with pytest.raises(ValueError, match="needs a target average"):
        ATPTrainingModel(base, modules, target_tokens=None)
    with pytest.raises(ValueError, match=r"N_target must be in \(0, 16\]"):
        ATPTrainingModel(base, modules, target_tokens=40)
    with pytest.raises(ValueError, match="take 9 vision tokens"):
        ATPTrainingModel(base, ATPModules(LAYERS, 9), target_tokens=4)
