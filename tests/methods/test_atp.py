"""ATP-LLaVA (inference) on the tiny random LLaVA (16 vision tokens on a 4 x 4 grid, 8 LLM layers: modules before
layers 1, 4, 6) and on LLaVA-1.5's geometry. The paper's equations are the reference (no public code)."""

import json
import math
import shutil
import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.atp import ATP_CONFIG, ATP_WEIGHTS, ATPModules, spatial_scores
from learnpruner_ext.config import budget_notice
from learnpruner_ext.methods import plan_method
from learnpruner_ext.methods.atp import default_layers
from llava.eval import run_llava
from llava.eval.answer_loop import _accounting
from llava.inference import build_prompt, prepare_batch

pytestmark = pytest.mark.usefixtures("no_grad")
QUESTIONS = ["What color is the circle?", "How many shapes are there in this picture?", "Is there a red square?"]
N, DEPTH, LAYERS = 16, 8, (1, 4, 6)


def _batch(loaded, images, questions=QUESTIONS):
    tokenizer, model, processor = loaded
    return prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])


def attach(model, budget=None, **kw):
    """ATP with an untrained module (warned about)."""
    with pytest.warns(UserWarning, match="UNTRAINED"):
        return apply_pruning(model, PruningConfig("atp", budget, **kw))


def set_thresholds(block, theta_r: float, theta_s: float) -> None:
    """Make a module's thresholds constants: zero weights, sigmoid(bias) = theta (0 and 1 exactly at +-1e4)."""
    logit = lambda t: -1e4 if t <= 0 else 1e4 if t >= 1 else math.log(t / (1 - t))  # noqa: E731
    for head, theta in ((block.head_r, theta_r), (block.head_s, theta_s)):
        head.weight.data.zero_()
        head.bias.data.fill_(logit(theta))


def record(method):
    """Wrap the method's selection: [(stage layer, module inputs, kept patch slots per row)] of every call."""
    log = []
    select, inputs_of = method.select_decoder, method.module_inputs

    def module_inputs(ctx):
        out = inputs_of(ctx)
        log.append({"layer": ctx.stage_layer, **out})
        return out

    def select_decoder(ctx):
        keep = select(ctx)
        slots = method.vision_slots(ctx) if ctx.vision_index.shape[1] else ctx.vision_index
        log_rows = [slots[b][keep[b][keep[b] >= 0]].tolist() for b in range(keep.shape[0])]
        calls.append((ctx.stage_layer, log_rows))
        return keep

    calls = []
    method.module_inputs, method.select_decoder = module_inputs, select_decoder
    return log, calls


def kept_per_stage(calls, batch):
    """{layer: [kept slots of sample b]} from the recorded calls (one batched call, or one call per sample)."""
    out = {}
    for layer, rows in calls:
        out.setdefault(layer, []).extend(rows)
    assert all(len(rows) == batch for rows in out.values())
    return out


# --------------------------------------------------------------------------- pure parts, by hand
def test_spatial_scores_by_hand():
    """The docstring's 4 x 4 grid: strides 2, 3, 4 at lambda 3 score 1 - 3/4, 1 - 3/9, 1 - 3/16; the largest wins."""
    a, b, c = 0.25, 1 - 3 / 9, 0.8125
    want = [c, 0, a, b,
            0, 0, 0, 0,
            a, 0, a, 0,
            b, 0, 0, b]  # fmt: skip
    assert torch.allclose(spatial_scores(4, 4), torch.tensor(want))
    s = spatial_scores(24, 24)  # LLaVA-1.5: samples of 144, 64, 36 patches (1/4, 1/9, 1/16); stride 4 is in stride 2,
    # strides 2 and 3 share the stride-6 sample (16), strides 3 and 4 the stride-12 one (4)
    assert int((s >= 0.25).sum()) == 144 + 64 - 16 and int((s >= b - 1e-6).sum()) == 64 + 36 - 4 and int((s == c).sum()) == 36
    with pytest.raises(ValueError, match=r"strides \[1\] give a spatial score"):
        spatial_scores(4, 4, (1, 2))
    with pytest.raises(ValueError, match="strictly ascending"):
        spatial_scores(4, 4, (3, 2))


def test_layers_and_plan():
    assert default_layers(32) == (4, 14, 24) and default_layers(DEPTH) == LAYERS and default_layers(4) == (2, 3)
    plan = plan_method(PruningConfig("atp", 144), num_vision_tokens=576, num_layers=32).plan
    assert plan.convention == "adaptive" and plan.stages == ((4, 576), (14, 576), (24, 576)) and plan.r2 is None
    notice = budget_notice(plan, 144, "atp")
    assert "adaptive" in notice and "the budget 144 is the target average" in notice and "measured" in notice
    full = plan_method(PruningConfig("atp", 576), num_vision_tokens=576, num_layers=32).plan
    assert full.stages == () and full.layer is None and full.average == 576  # T = N: nothing is pruned
    custom = plan_method(PruningConfig("atp", 64, options={"layers": [2, 9]}), num_vision_tokens=576, num_layers=32)
    assert custom.plan.stages == ((2, 576), (9, 576))
    with pytest.raises(ValueError, match=r"atp module layer must satisfy 0 < k < 32.*got 40"):
        plan_method(PruningConfig("atp", 64, options={"layers": [4, 40]}), num_vision_tokens=576, num_layers=32)
    with pytest.raises(ValueError, match="strictly ascending list of decoder layers"):
        plan_method(PruningConfig("atp", 64, options={"layers": [14, 4]}), num_vision_tokens=576, num_layers=32)


def test_masks_by_hand():
    """Eqs. 9-11 and the hard rule on one module with constant thresholds theta_r = 0.3, theta_s = 0.5."""
    modules = ATPModules((1,), 4, hidden_features=3, temperature=10.0)
    block = modules[1]
    set_thresholds(block, 0.3, 0.5)
    s_self, s_cross = torch.tensor([[0.1, 0.5, 0.2, 0.0]]), torch.tensor([[0.1, 0.3, 0.4, 0.2]])  # S_r .1 .4 .3 .1
    s_spatial, slots = torch.tensor([[0.8125, 0.0, 0.25, 0.0]]), torch.tensor([[0, 1, 2, 3]])
    soft = block.soft_mask(s_self, s_cross, s_spatial, slots, modules.temperature)
    s_r = torch.tensor([0.1, 0.4, 0.3, 0.1])
    want = torch.maximum(torch.sigmoid((s_r - 0.3) * 10), torch.sigmoid((s_spatial[0] - 0.5) * 10))
    assert torch.allclose(soft[0], want, atol=1e-6)
    keep = block.keep_mask(s_self, s_cross, s_spatial, slots)
    assert keep.tolist() == [[True, True, True, False]]  # spatial, redundant, redundant at S_r = theta_r, none
    assert keep.tolist() == (soft >= 0.5).tolist()


def test_max_normalised_redundant_score_by_hand():
    """score_norm="max": S_r / max(S_r over the valid tokens) is compared with theta_r. S_r = .1 .4 .3 .1 (max .4)
    -> .25 1 .75 .25; theta_r = 0.5, theta_s = 1 (no spatial token): keeps tokens 1 and 2. A padding slot (valid
    False) with a larger S_r is left out of the maximum. The thresholds' input is the raw scores either way."""
    modules = ATPModules((1,), 4, hidden_features=3, temperature=10.0, self_score="attention", score_norm="max")
    block = modules[1]
    set_thresholds(block, 0.5, 1.0)
    s_self, s_cross = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.9]]), torch.tensor([[0.1, 0.3, 0.4, 0.2, 0.9]])
    s_spatial, slots = torch.zeros(1, 5), torch.tensor([[0, 1, 2, 3, 0]])
    valid = torch.tensor([[True, True, True, True, False]])
    assert block.keep_mask(s_self, s_cross, s_spatial, slots, valid)[0, :4].tolist() == [False, True, True, False]
    soft = block.soft_mask(s_self, s_cross, s_spatial, slots, modules.temperature, valid)
    want = torch.sigmoid((torch.tensor([0.25, 1.0, 0.75, 0.25]) - 0.5) * 10)
    assert torch.allclose(soft[0, :4], torch.maximum(want, torch.sigmoid(torch.tensor(-10.0))), atol=1e-6)
    with pytest.raises(ValueError, match="score_norm='max' needs positive scores"):
        ATPModules((1,), 4, score_norm="max")  # the default self_score="logits"


def test_threshold_input_pads_pruned_slots_with_zeros():
    """A layer with fewer tokens writes each score at its patch's slot of the width-2N input, zeros elsewhere."""
    modules = ATPModules((1,), 4, hidden_features=2)
    block = modules[1]
    seen = []
    block.proj.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    block.thresholds(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[1, 3]]))
    assert seen[0].tolist() == [[0, 1, 0, 2, 0, 3, 0, 4]]


# --------------------------------------------------------------------------- scores against eager attention
@pytest.mark.parametrize("self_score", ["logits", "attention"])
def test_scores_match_eager(loaded, images, eager, self_score):
    """At the first module (layer 1, scored with layer 0's attention): S_self (Eq. 3: mean over heads and vision
    queries of the logits q.k/sqrt(d); or of the softmax) and S_cross (Eq. 4: mean over heads and the text after
    the image of the softmax), against q/k recomputed with transformers' RoPE and eager attention weights."""
    _, model, _ = loaded
    method = attach(model, 6, options={"self_score": self_score})
    log, _ = record(method)
    batch = _batch(loaded, images)
    model(**batch)
    first = log[0]
    assert first["layer"] == 1
    out = eager(**batch, output_attentions=True, output_hidden_states=True)
    lm = eager.model.language_model
    layer = lm.layers[0]
    hidden = out.hidden_states[0]
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = q @ k.transpose(-1, -2) * attn.scaling  # [B, H, S, S], no mask (Eq. 3 reads A_logits before M)
    probs = out.attentions[0]  # [B, H, S, S] eager softmax
    vision = batch["input_ids"] == model.config.image_token_id
    for b in range(3):
        vis = vision[b].nonzero()[:, 0]
        text = torch.arange(int(vis[-1]) + 1, hidden.shape[1])
        ref_self = (logits if self_score == "logits" else probs)[b][:, vis][:, :, vis].mean(dim=(0, 1))
        ref_cross = probs[b][:, text][:, :, vis].mean(dim=(0, 1))
        assert (first["s_self"][b] - ref_self).abs().max() <= 1e-5
        assert (first["s_cross"][b] - ref_cross).abs().max() <= 1e-5
        assert first["slots"][b].tolist() == list(range(N))
        assert torch.equal(first["s_spatial"][b], spatial_scores(4, 4))


# --------------------------------------------------------------------------- keep-all thresholds are exact
def test_keep_all_thresholds_equal_unpruned(loaded, images):
    """theta_r = theta_s = 0 exactly: every spatial score (>= 0) reaches theta_s, so all tokens stay at every
    module; logits and generated tokens equal the unpruned model's."""
    tokenizer, model, _ = loaded
    batch = _batch(loaded, images)
    apply_pruning(model, PruningConfig("none"))
    ref = model(**batch).logits
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ref_tokens = model.generate(**batch, **kwargs)
    method = attach(model, 6)
    for k in LAYERS:
        set_thresholds(method.atp[k], 0.0, 0.0)
    out = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (out - ref)[mask].abs().max() <= 1e-5
    assert model.last_pruning_trace().vision_tokens_per_sample == [[N] * DEPTH] * 3
    assert torch.equal(model.generate(**batch, **kwargs), ref_tokens)


# --------------------------------------------------------------------------- adaptive counts, compounding, batches
def calibrated(model, loaded, images):
    """ATP (self_score="attention", so S_r is in (0, 1)) with constant per-module thresholds: theta_s = 1 (no
    spatial token) and theta_r midway between two of the batch's S_r values at that module, chosen so that the
    samples keep as many different counts as possible (then the widest gap), found module by module (a module's
    scores depend on the cuts before it)."""
    method = attach(model, 6, options={"self_score": "attention"})
    batch = _batch(loaded, images)
    for k in LAYERS:
        set_thresholds(method.atp[k], 0.0, 0.0)
    for k in LAYERS:
        log, _ = record(method)
        model(**batch)
        rows = [row for e in log if e["layer"] == k for row in (e["s_self"] + e["s_cross"]) / 2]  # one per sample
        values = torch.cat(rows).sort().values
        best = None
        for low, high in zip(values.tolist(), values[1:].tolist()):
            theta = (low + high) / 2
            counts = [int((row >= theta).sum()) for row in rows]
            key = (len(set(counts)), min(counts) > 0, high - low)
            if high - low > 1e-6 and (best is None or key > best[0]):
                best = (key, theta)
        set_thresholds(method.atp[k], best[1], 1.0)
        del method.module_inputs, method.select_decoder  # back to the class's methods
    return method, batch


def test_compounding_batch_equals_singles_and_accounting(loaded, images):
    tokenizer, model, _ = loaded
    method, batch = calibrated(model, loaded, images)
    _, calls = record(method)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    trace = model.last_pruning_trace()
    kept = kept_per_stage(calls, 3)
    # compounding: a token dropped at one module never reappears (the kept sets are nested)
    for b in range(3):
        sets = [set(kept[k][b]) for k in LAYERS]
        assert sets[0] >= sets[1] >= sets[2], (b, sets)
        assert kept[LAYERS[0]][b] == sorted(kept[LAYERS[0]][b])
    counts = [[len(kept[k][b]) for k in LAYERS] for b in range(3)]
    assert len({tuple(c) for c in counts}) > 1, counts  # samples keep different counts: the per-sample cut
    # the trace's per-sample, per-layer counts are the measured ones, and the answer lines carry them
    for b in range(3):
        want = [N] * LAYERS[0] + sum(([len(kept[k][b])] * (end - k) for k, end in zip(LAYERS, LAYERS[1:] + (DEPTH,))), [])
        assert trace.vision_tokens_per_sample[b] == want
    lines = _accounting(model, True, 3)
    assert [line["vision_tokens_per_layer"] for line in lines] == trace.vision_tokens_per_sample
    assert all(line["convention"] == "adaptive" and line["r2"] is None for line in lines)
    final = [sorted(kept[LAYERS[-1]][b]) for b in range(3)]
    assert [[i for i in row if i >= 0] for row in trace.stage2_index.tolist()] == final
    # a batch equals single runs: tokens and kept indices
    for i in range(3):
        calls.clear()
        single_batch = _batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1])
        single = model.generate(**single_batch, **kwargs)[:, single_batch["input_ids"].shape[1]:]
        assert single[0].tolist() == batched[i].tolist()
        one = kept_per_stage(calls, 1)
        assert all(one[k][0] == kept[k][i] for k in LAYERS)
        assert model.last_pruning_trace().vision_tokens_per_sample[0] == trace.vision_tokens_per_sample[i]


# --------------------------------------------------------------------------- modules on disk, CLI, checkpoint
def test_save_load_round_trip(tmp_path):
    modules = ATPModules(LAYERS, N, hidden_features=8, temperature=50.0, strides=(2, 4), num_layers=DEPTH, target_tokens=6)
    modules.trained = True
    modules.save_pretrained(tmp_path / "atp")
    config = json.loads((tmp_path / "atp" / ATP_CONFIG).read_text())
    assert config == {"layers": list(LAYERS), "num_tokens": N, "hidden_features": 8, "temperature": 50.0,
                      "lambda_sample": 3.0, "strides": [2, 4], "self_score": "logits", "score_norm": "none", "num_layers": DEPTH,
                      "target_tokens": 6, "trained": True}  # fmt: skip
    loaded = ATPModules.from_pretrained(tmp_path / "atp")
    assert loaded.config_dict() == modules.config_dict()
    assert all(torch.equal(a, b) for a, b in zip(modules.state_dict().values(), loaded.state_dict().values()))
    assert ATPModules.from_pretrained(tmp_path / "atp" / ATP_WEIGHTS).layers == LAYERS


def random_module_folder(path, trained=True, seed=1):
    torch.manual_seed(seed)
    modules = ATPModules(LAYERS, N, num_layers=DEPTH)
    for k in LAYERS:
        set_thresholds(modules[k], 1.0, 0.5)  # keeps the stride-3/4 samples (scores 2/3, 0.8125) and S_r >= 1
    modules.trained = trained
    modules.save_pretrained(path)
    return modules


def test_run_llava_cli_with_atp_path(tiny_hf, images, tmp_path, capsys, recwarn):
    random_module_folder(tmp_path / "atp")
    image = tmp_path / "img.png"
    images[0].save(image)
    argv = ["--model-path", str(tiny_hf), "--image-file", str(image), "--query", "What color?", "--json",
            "--max_new_tokens", "3", "--pruning-method", "atp", "--visual-token-budget", "6",
            "--atp-path", str(tmp_path / "atp")]  # fmt: skip
    result = run_llava.main(argv)
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["method"] == "atp" and printed["budget"] == 6 and printed["convention"] == "adaptive"
    per_layer = printed["vision_tokens_per_layer"]
    assert per_layer[:LAYERS[0]] == [N] * LAYERS[0] and min(per_layer) < N
    assert printed["vision_tokens_per_sample"] == [per_layer]
    assert printed["average_vision_tokens"] == pytest.approx(sum(per_layer) / DEPTH)
    assert "adaptive pruning" in captured.err and result["answer"] == printed["answer"]
    assert not [w for w in recwarn if "UNTRAINED" in str(w.message)]


def test_checkpoint_atp_folder_is_used_without_a_path(tiny_hf, tmp_path, caplog):
    from llava.model.builder import load_pretrained_model

    ckpt = shutil.copytree(tiny_hf, tmp_path / "ckpt")
    shipped = random_module_folder(ckpt / "atp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model, _, _ = load_pretrained_model(str(ckpt), None, None, device="cpu", dtype="float32",
                                               pruning=PruningConfig("atp", 6))  # fmt: skip
    assert not [w for w in caught if "UNTRAINED" in str(w.message)]  # a trained module
    assert model.pruner.config.atp_path == str(ckpt / "atp") and model.pruner.atp.trained
    assert "using the checkpoint's ATP modules" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), model.pruner.atp.state_dict().values()))


def test_bad_atp_inputs(loaded, tmp_path):
    _, model, _ = loaded
    with pytest.raises(FileNotFoundError, match=r"no ATP modules at .*missing: expected atp.safetensors and atp_config.json"):
        apply_pruning(model, PruningConfig("atp", 6, atp_path=str(tmp_path / "missing")))
    folder = tmp_path / "atp"
    random_module_folder(folder)
    (folder / ATP_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="bad ATP config"):
        apply_pruning(model, PruningConfig("atp", 6, atp_path=str(folder)))
    random_module_folder(folder)
    (folder / ATP_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot load ATP weights"):
        apply_pruning(model, PruningConfig("atp", 6, atp_path=str(folder)))
    ATPModules((1, 4, 6), 36).save_pretrained(tmp_path / "n36")  # another base's vision tokens
    with pytest.raises(ValueError, match="take 36 vision tokens per image but this model gives 16"):
        apply_pruning(model, PruningConfig("atp", 6, atp_path=str(tmp_path / "n36")))
    ATPModules((4, 14, 24), N).save_pretrained(tmp_path / "deep")  # placed for a 32-layer LLM
    with pytest.raises(ValueError, match=r"atp module layer must satisfy 0 < k < 8 .*got 14"):
        apply_pruning(model, PruningConfig("atp", 6, atp_path=str(tmp_path / "deep")))
    random_module_folder(folder)
    with pytest.raises(ValueError, match="option temperature=5 contradicts the modules"):
        apply_pruning(model, PruningConfig("atp", 6, atp_path=str(folder), options={"temperature": 5}))
    with pytest.raises(ValueError, match=r"0 < k < 8.*got 9"):
        apply_pruning(model, PruningConfig("atp", 6, options={"layers": [1, 9]}))
