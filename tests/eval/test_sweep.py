"""llava.eval.sweep: methods x budgets x benchmarks -> results.csv/json, Table-1 markdown, accuracy-vs-budget PNG."""

from __future__ import annotations

import csv
import json

import pytest

from llava.eval import benchmarks as B
from llava.eval import sweep

# Table 1 of the paper (LLaVA-1.5-7B): vanilla and LearnPruner at 128 / 64 tokens, benchmarks in B.ORDER
PAPER = {
    ("none", None): [61.9, 69.5, 58.2, 85.9, 1862, 78.5, 64.7, 58.3],
    ("learnpruner", 128): [60.3, 68.5, 57.3, 86.7, 1820, 77.3, 63.8, 56.8],
    ("learnpruner", 64): [58.9, 68.3, 56.6, 86.8, 1750, 76.0, 62.6, 55.7],
}


def paper_results():
    rows = [{"method": m, "budget": b, "benchmark": name, "status": "ok", "value": v, "avg_vision_tokens": b or 576,
             "note": ""} for (m, b), values in PAPER.items() for name, v in zip(B.ORDER, values)]
    rows += [{"method": "fastv", "budget": 32, "benchmark": name, "status": "infeasible", "value": None,
              "avg_vision_tokens": None, "note": "BudgetError: needs >= 37"} for name in B.ORDER]
    benches = [B.BENCHMARKS[n] for n in B.ORDER]
    results = {"model_id": "llava-v1.5-7b", "num_vision_tokens": 576, "methods": ["none", "learnpruner", "fastv"],
               "budgets": [128, 64, 32], "rows": rows}
    results["relacc"] = sweep.relative_accuracy(rows, benches)
    return results, benches


def test_relacc_reproduces_paper_table1():
    results, benches = paper_results()
    rel = results["relacc"]
    assert rel["none@None"] == pytest.approx(100.0)
    assert round(rel["learnpruner@128"], 1) == 98.5 and round(rel["learnpruner@64"], 1) == 96.9  # paper: 98.5%, 96.9%
    assert rel["fastv@32"] == "infeasible"
    table = sweep.markdown_table(results, benches)
    assert "| Method | Avg. tokens | GQA | SQA-I | VQA-T | POPE | MME | VQAv2 | MMB | MMB-CN | RelAcc. |" in table
    assert "| *Upper Bound, 576 Tokens (100%)* |" in table and "| *Retain Averaged 128 Tokens (↓ 77.8%)* |" in table
    assert "| Vanilla (none) | 576.0 | 61.9 | 69.5 | 58.2 | 85.9 | 1862 | 78.5 | 64.7 | 58.3 | 100.0% |" in table
    assert "| learnpruner | 128.0 | 60.3 | 68.5 | 57.3 | 86.7 | 1820 | 77.3 | 63.8 | 56.8 | 98.5% |" in table
    assert "| fastv | – | infeasible |" in table and "infeasible: fastv @ 32: BudgetError" in table


def test_sweep_outputs(script_runs):
    """scripts/v1_5/eval/sweep.sh: 2 methods x 2 budgets x 2 benchmarks (budget 64 > 16 tokens: infeasible)."""
    results, root = script_runs
    rc, output = results["sweep"]
    assert rc == 0, output[-3000:]
    out = root.parent / "sweep"
    rows = list(csv.DictReader(open(out / "results.csv")))
    got = {(r["method"], r["budget"], r["benchmark"]): r for r in rows}
    assert set(got) == {(m, b, bench) for m, b in [("none", ""), ("learnpruner", "8"), ("learnpruner", "64")]
                        for bench in ("pope", "sqa")}
    assert {got[("learnpruner", "64", b)]["status"] for b in ("pope", "sqa")} == {"infeasible"}
    for m, b in [("none", ""), ("learnpruner", "8")]:
        assert got[(m, b, "pope")]["status"] == "ok" and got[(m, b, "pope")]["metric"] == "f1_mean"
        assert float(got[(m, b, "pope")]["value"]) >= 0
    assert float(got[("learnpruner", "8", "pope")]["avg_vision_tokens"]) == 8.0  # measured: (12+12+4+4)/4
    assert float(got[("none", "", "pope")]["avg_vision_tokens"]) == 16.0
    data = json.loads((out / "results.json").read_text())
    assert data["relacc"]["learnpruner@64"] == "infeasible" and data["benchmarks"] == ["pope", "sqa"]
    table = (out / "table.md").read_text()
    assert "| Method | Avg. tokens | POPE | SQA-I | RelAcc. |" in table
    assert "Vanilla (none)" in table and "| learnpruner | – | infeasible | infeasible | infeasible |" in table
    assert (out / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "answers" / "pope" / "tiny-llava-learnpruner-8" / "metrics.json").is_file()


def test_sweep_input_errors(tmp_path, eval_root, monkeypatch):
    import llava.model.builder as builder

    monkeypatch.setattr(builder, "load_pretrained_model", lambda *a, **k: pytest.fail("model loaded"))
    base = ["--model-path", str(tmp_path), "--eval-root", str(eval_root), "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['nope'\]; valid benchmarks: gqa, sqa, textvqa"):
        sweep.main(base + ["--benchmarks", "pope,nope"])
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['magic'\]; valid methods:"):
        sweep.main(base + ["--benchmarks", "pope", "--methods", "none,magic"])
    with pytest.raises(ValueError, match="'x' is not an integer"):
        sweep.main(base + ["--benchmarks", "pope", "--budgets", "64,x"])
    with pytest.raises(ValueError, match="positive integer, got 0"):
        sweep.main(base + ["--benchmarks", "pope", "--budgets", "0"])
    with pytest.raises(FileNotFoundError, match=r"benchmark data missing .*gqa: .*llava_gqa_testdev_balanced\.jsonl"):
        sweep.main(base[:2] + ["--eval-root", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--benchmarks", "gqa"])
    assert not (tmp_path / "out").exists()


def test_sweep_answers_equal_the_generator_cli(tiny_ckpt, tiny_lpm, eval_root, tmp_path, monkeypatch):
    """The sweep loads the model once, attaches each (method, budget) once for all its benchmarks, and writes the
    same answer lines (text, accounting, run identity) as the generator CLI the eval scripts run; so the CLI
    resumes a sweep's answers file without redoing anything."""
    import llava.model.builder as builder
    from llava.eval import model_vqa_loader, model_vqa_science

    calls = {"load": 0, "apply": 0}
    load, apply = builder.load_pretrained_model, sweep.apply_pruning

    def counting_load(*a, **k):
        calls["load"] += 1
        return load(*a, **k)

    def counting_apply(*a, **k):
        calls["apply"] += 1
        return apply(*a, **k)

    monkeypatch.setattr(builder, "load_pretrained_model", counting_load)
    monkeypatch.setattr(sweep, "apply_pruning", counting_apply)
    out = tmp_path / "sweep"
    sweep.main(["--model-path", str(tiny_ckpt), "--methods", "none,learnpruner", "--budgets", "8", "--benchmarks",
                "pope,sqa", "--eval-root", str(eval_root), "--out", str(out), "--lpm-path", str(tiny_lpm),
                "--max-new-tokens", "3", "--batch-size", "4", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert calls == {"load": 1, "apply": 2}  # 2 (method, budget) x 2 benchmarks: pruning attached once per pair
    monkeypatch.undo()
    cli = ["--model-path", str(tiny_ckpt), "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "3",
           "--batch-size", "4", "--device", "cpu", "--no-progress", "--pruning-method", "learnpruner",
           "--visual-token-budget", "8", "--lpm-path", str(tiny_lpm)]  # fmt: skip
    cases = {"pope": (model_vqa_loader, ["--question-file", str(eval_root / "pope" / "llava_pope_test.jsonl"),
                                         "--image-folder", str(eval_root / "pope" / "val2014")]),
             "sqa": (model_vqa_science, ["--question-file", str(eval_root / "scienceqa" / "llava_test_CQM-A.json"),
                                         "--image-folder", str(eval_root / "scienceqa" / "images" / "test"),
                                         "--single-pred-prompt"])}  # fmt: skip
    for bench, (module, questions) in cases.items():
        swept = out / "answers" / bench / "tiny-llava-learnpruner-8" / "answers.jsonl"
        mine = tmp_path / f"{bench}.jsonl"
        module.main(cli + questions + ["--answers-file", str(mine)])
        strip = lambda path: sorted((json.dumps({k: v for k, v in json.loads(line).items() if k != "answer_id"},
                                                sort_keys=True) for line in open(path)))  # fmt: skip
        assert strip(swept) == strip(mine) and len(strip(mine)) == {"pope": 6, "sqa": 5}[bench]
        assert module.main(cli + questions + ["--answers-file", str(swept)]).generated == 0
