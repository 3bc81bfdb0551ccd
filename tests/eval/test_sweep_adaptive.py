"""llava.eval.sweep and adaptive methods (ATP): trained modules per budget (``--atp-path 'DIR/t{budget}'``), the
per-instance token statistics in results.csv, the achieved-vs-requested cells and percentile section of table.md,
and tokens_histogram.png. The tiny LLaVA of conftest (4 decoder layers, 16 vision tokens) on the mini benchmarks;
ATP modules saved with ``ATPModules.save_pretrained`` before layers 1, 2, 3, their redundancy threshold shifted so
that the kept counts vary across prompts (a random module on this model otherwise keeps only the spatial samples)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from llava.eval import sweep

BUDGETS = (12, 8)
# per budget: (seed, bias of the redundancy-threshold head): two different modules, both with varying counts
MODULES = {12: (1, -6.0), 8: (2, -5.0)}
OLD_FIELDS = ["method", "budget", "benchmark", "status", "metric", "value", "n", "missing", "r1", "r2", "layer",
              "avg_vision_tokens", "extra", "note", "answers_file"]  # fmt: skip


def save_atp(path: Path, seed: int, bias: float, target: int) -> Path:
    import torch

    from learnpruner_ext.atp import ATPModules

    torch.manual_seed(seed)
    modules = ATPModules((1, 2, 3), 16, num_layers=4, target_tokens=target)
    with torch.no_grad():
        for k in modules.layers:
            modules[k].head_r.weight.mul_(0.01)  # theta_r ~ sigmoid(bias): between the tokens' redundancy scores
            modules[k].head_r.bias.fill_(bias)
    modules.trained = True  # random, but marked trained: no warning
    modules.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def atp_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("atp")
    for budget, (seed, bias) in MODULES.items():
        save_atp(root / f"t{budget}", seed, bias, budget)
    return root


def flags(ckpt, eval_root, out, *extra) -> list[str]:
    return ["--model-path", str(ckpt), "--benchmarks", "pope,sqa", "--eval-root", str(eval_root), "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "4", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def adaptive_sweep(tiny_ckpt, eval_root, atp_root, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("adaptive") / "sweep"
    argv = flags(tiny_ckpt, eval_root, out, "--methods", "none,atp,random", "--budgets", ",".join(map(str, BUDGETS)),
                 "--atp-path", str(atp_root / "t{budget}"))  # fmt: skip
    sweep.main(argv)
    return out, argv


def csv_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def hand_stats(answers_file: str) -> dict:
    """From the answers file: each image prompt's mean over layers of vision_tokens_per_layer, sorted by hand; the
    5/25/50/75/95th percentiles by linear interpolation at position (n-1)*q/100, the mean and population std."""
    values = []
    for line in open(answers_file):
        rec = json.loads(line)
        if rec["metadata"].get("text_only"):
            continue
        values.append(sum(rec["vision_tokens_per_layer"]) / len(rec["vision_tokens_per_layer"]))
    values.sort()
    n = len(values)
    out = {}
    for q in (5, 25, 50, 75, 95):
        pos = (n - 1) * q / 100
        i = int(pos)
        j = min(i + 1, n - 1)
        out[f"tokens_p{q}"] = values[i] + (values[j] - values[i]) * (pos - i)
    mean = sum(values) / n
    out["avg_vision_tokens"] = mean
    out["tokens_std"] = (sum((v - mean) ** 2 for v in values) / n) ** 0.5
    out["n_images"] = n
    return out


def test_token_percentiles_equal_a_hand_computation(adaptive_sweep):
    out, _ = adaptive_sweep
    with open(out / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[: len(OLD_FIELDS)] == OLD_FIELDS  # the old columns first, in their order
    assert header[len(OLD_FIELDS):] == ["tokens_p5", "tokens_p25", "tokens_p50", "tokens_p75", "tokens_p95",
                                        "tokens_std", "atp_path", "lpm_path"]  # fmt: skip
    rows = csv_rows(out)
    assert len(rows) == 2 * (1 + 2 * len(BUDGETS)) and all(r["status"] == "ok" for r in rows)
    for r in rows:
        want = hand_stats(r["answers_file"])
        assert want["n_images"] == {"pope": 6, "sqa": 3}[r["benchmark"]]  # SQA's 2 text-only prompts left out
        for key in ("avg_vision_tokens", "tokens_p5", "tokens_p25", "tokens_p50", "tokens_p75", "tokens_p95",
                    "tokens_std"):  # fmt: skip
            assert float(r[key]) == pytest.approx(want[key], abs=1e-9), (r["method"], r["budget"], r["benchmark"], key)
        fixed = r["method"] in ("none", "random")
        assert (float(r["tokens_std"]) == 0.0) == fixed, r  # ATP's counts vary, the fixed methods' do not
    json_rows = json.loads((out / "results.json").read_text())["rows"]
    assert [float(r["tokens_p50"]) for r in rows] == pytest.approx([r["tokens_p50"] for r in json_rows])


def test_percentile_is_numpys_linear_default():
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 50):
        values = rng.normal(50, 10, n).round(2).tolist()
        for q in (0, 5, 25, 50, 75, 95, 100):
            assert sweep.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)
    assert sweep.token_stats([10.25] * 7)["tokens_std"] == 0.0 and sweep.token_stats([])["tokens_std"] is None


def test_budget_placeholder_picks_each_budgets_modules(adaptive_sweep, atp_root, tiny_ckpt, eval_root):
    """Each ATP job ran the modules of its budget's folder: results.csv, jobs.json and every answer line's run
    identity (path and fingerprint) name it; the two modules keep different counts (the same modules give the same
    counts at every budget: the budget is only recorded). Re-running resumes everything; one shared folder for
    both budgets is another run and is refused, never mixed."""
    from llava.eval.answer_loop import InputError
    from llava.model.fingerprint import folder_fingerprint

    out, argv = adaptive_sweep
    rows = csv_rows(out)
    counts = {}
    for budget in BUDGETS:
        folder = os.path.abspath(atp_root / f"t{budget}")
        mine = [r for r in rows if (r["method"], r["budget"]) == ("atp", str(budget))]
        assert len(mine) == 2 and {r["atp_path"] for r in mine} == {folder} and {r["lpm_path"] for r in mine} == {""}
        for r in mine:
            lines = [json.loads(x) for x in open(r["answers_file"])]
            pruning = {(x["metadata"]["settings"]["pruning"]["atp_path"],
                        x["metadata"]["settings"]["pruning"]["atp_fingerprint"]) for x in lines}  # fmt: skip
            assert pruning == {(folder, folder_fingerprint(folder))}
            counts[(budget, r["benchmark"])] = [x["vision_tokens_per_layer"] for x in lines]
    assert all(r["atp_path"] == "" for r in rows if r["method"] != "atp")
    assert counts[(12, "pope")] != counts[(8, "pope")] and counts[(12, "sqa")] != counts[(8, "sqa")]
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    atp_jobs = {(j["budget"], j["bench"]): j["modules"]["atp_path"] for j in jobs if j["method"] == "atp"}
    assert atp_jobs == {(b, bench): os.path.abspath(atp_root / f"t{b}") for b in BUDGETS for bench in ("pope", "sqa")}

    sweep.main(argv)  # the same command: every job complete, nothing answered again
    assert json.loads((out / "jobs.json").read_text())["jobs"] == []
    shared = [x if x != str(atp_root / "t{budget}") else str(atp_root / "t12") for x in argv]
    with pytest.raises(InputError, match=r"other settings .*pruning\.atp_path"):
        sweep.main(shared)  # budget 8's answers were written by t8's modules


def test_missing_substituted_path_is_one_error_before_the_model_loads(tiny_ckpt, eval_root, atp_root, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """Budget 4 has no folder: one error naming the flag, the budget and the path, before the model loads and
    before anything is written; --lpm-path takes {budget} the same way."""
    import llava.model.builder as builder

    monkeypatch.setattr(builder, "load_pretrained_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "sweep"
    template = str(atp_root / "t{budget}")
    with pytest.raises(FileNotFoundError) as err:
        sweep.main(flags(tiny_ckpt, eval_root, out, "--methods", "none,atp", "--budgets", "12,8,4", "--atp-path", template))
    message = str(err.value)
    assert f"--atp-path {template!r} at budget 4 (atp): {atp_root / 't4'} does not exist" in message
    assert "t12" not in message and "t8" not in message
    with pytest.raises(FileNotFoundError, match=r"--lpm-path .* at budget 8 \(learnpruner\): .*lpm-8 does not exist"):
        sweep.main(flags(tiny_ckpt, eval_root, out, "--methods", "learnpruner", "--budgets", "8", "--lpm-path",
                         str(tmp_path / "lpm-{budget}")))  # fmt: skip
    assert not out.exists()


def test_table_and_histogram_of_an_adaptive_sweep(adaptive_sweep, tiny_ckpt, eval_root, tmp_path):
    """The varying runs get "T (achieved A)" cells (when 0.5 or more off), a percentile section per benchmark and
    tokens_histogram.png; a sweep of fixed-budget methods gets none of them (a stale histogram is removed)."""
    out, _ = adaptive_sweep
    table = (out / "table.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    for budget in BUDGETS:
        mine = [r for r in rows if (r["method"], r["budget"]) == ("atp", budget)]
        avg = sum(r["avg_vision_tokens"] for r in mine) / len(mine)  # the run's cell: the mean over benchmarks
        cell = f"{budget} (achieved {avg:.1f})" if abs(avg - budget) > 0.5 else f"{avg:.1f}"
        assert f"| atp | {cell} |" in table
        for r in mine:  # its line in the benchmark's percentile table
            cells = [f"{r['avg_vision_tokens']:.1f}", f"{r['tokens_std']:.2f}",
                     *(f"{r[f'tokens_p{q}']:.1f}" for q in (5, 25, 50, 75, 95))]  # fmt: skip
            assert f"| atp | {budget} | " + " | ".join(cells) + " |" in table
    assert "| random | 12.0 |" in table and "| random | 8.0 |" in table and "| Vanilla (none) | 16.0 |" in table
    section = table.split("## Vision tokens per instance", 1)[1]
    assert "### POPE" in section and "### SQA-I" in section
    assert "| Method | Budget | Achieved | Std | p5 | p25 | p50 | p75 | p95 |" in section
    assert "| random |" not in section and "| none |" not in section
    histogram = out / "tokens_histogram.png"
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and histogram.stat().st_size > 5000
    assert json.loads((out / "results.json").read_text())["files"]["histogram"] == str(histogram)

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    (fixed / "tokens_histogram.png").write_bytes(b"stale")
    sweep.main(flags(tiny_ckpt, eval_root, fixed, "--methods", "none,random", "--budgets", "8"))
    assert not (fixed / "tokens_histogram.png").exists() and (fixed / "accuracy_vs_budget.png").is_file()
    table = (fixed / "table.md").read_text()
    assert "Vision tokens per instance" not in table and "achieved" not in table.split("\n\n", 2)[2]
    assert "histogram" not in json.loads((fixed / "results.json").read_text())["files"]


def test_achieved_cells_and_the_toy_report():
    """table.md's Avg. tokens cell: "T (achieved A)" when the measured average is more than 0.5 from T. The toy
    report shows it only for rows whose counts vary, so its fixed-budget rows (e.g. FastV after_layer) are as before."""
    from toyworld import report

    assert sweep._avg_cell(72, 70.4) == "72 (achieved 70.4)" and sweep._avg_cell(72, 71.6) == "71.6"
    assert sweep._avg_cell(None, 576.0) == "576.0" and sweep._avg_cell(16, None) == "–"
    by_type = {t: 50.0 for t in report.TYPES}
    rows = [{"method": "none", "budget": None, "status": "ok", "overall": 90.0, "by_type": by_type, "avg": 144.0,
             "note": "", "tokens_std": 0.0},
            {"method": "fastv (after_layer)", "budget": 16, "status": "ok", "overall": 60.0, "by_type": by_type,
             "avg": 80.0, "note": "", "tokens_std": 0.0},
            {"method": "random", "budget": 16, "status": "ok", "overall": 70.0, "by_type": by_type, "avg": 16.0,
             "note": ""},
            {"method": "atp", "budget": 16, "status": "ok", "overall": 75.0, "by_type": by_type, "avg": 13.3,
             "note": "", "tokens_std": 2.5}]  # fmt: skip
    md = report.markdown({"num_vision_tokens": 144, "budgets": [16]}, rows, [])
    assert "| fastv (after_layer) | 80.0 |" in md and "| random | 16.0 |" in md and "| Vanilla (none) | 144.0 |" in md
    assert "| atp | 16 (achieved 13.3) |" in md
