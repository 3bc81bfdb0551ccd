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


# Table 4 of the paper (Qwen2.5-VL-7B): GQA, SQA-I, VQA-T, MME, VQAv2, MMB
PAPER_TABLE4 = {
    ("none", None): [59.7, 77.4, 76.7, 2324, 83.9, 83.8],
    ("fastv", 426): [58.4, 79.1, 75.7, 2330, 81.4, 81.4], ("learnpruner", 426): [59.3, 77.4, 75.2, 2339, 82.4, 83.2],
    ("fastv", 284): [53.6, 77.8, 72.7, 2228, 77.8, 79.1], ("learnpruner", 284): [59.0, 77.0, 74.4, 2358, 81.7, 82.2],
    ("fastv", 142): [42.8, 70.5, 54.8, 1565, 57.2, 56.2], ("learnpruner", 142): [51.9, 76.1, 70.8, 2292, 79.3, 81.8],
}  # fmt: skip


def test_relacc_and_layout_of_paper_table4():
    """The Qwen family's table: six columns, budgets 426/284/142 of 1280. RelAcc from the paper's cells, e.g.
    FastV @ 426 = mean(58.4/59.7, 79.1/77.4, 75.7/76.7, 2330/2324, 81.4/83.9, 81.4/83.8) = mean(0.9782, 1.0220,
    0.9870, 1.0026, 0.9702, 0.9714) = 98.85% (paper 98.9%). At 426 and 284 all four rows give the paper's value
    (98.9/99.3, 94.7/98.7); at 142 the cells give 72.8% (FastV) and 94.7% (LearnPruner) where the paper prints
    71.4% and 94.1%: the printed 142-token RelAcc does not follow from the printed cells (docs/evaluation.md)."""
    table = sweep.FAMILY_TABLES["qwen2_5_vl"]
    assert (table.table, table.budgets, table.conv_mode) == ("Table 4", "426,284,142", "qwen2_5_vl")
    benches = [B.BENCHMARKS[n] for n in table.benchmarks]
    rows = [{"method": m, "budget": b, "benchmark": name, "status": "ok", "value": v, "avg_vision_tokens": b or 1280,
             "note": ""} for (m, b), values in PAPER_TABLE4.items() for name, v in zip(table.benchmarks, values)]
    results = {"model_id": "qwen2.5-vl-7b", "num_vision_tokens": 1280, "methods": ["none", "fastv", "learnpruner"],
               "budgets": [426, 284, 142], "rows": rows, "paper_table": table.table}
    results["relacc"] = rel = sweep.relative_accuracy(rows, benches)
    got = {k: round(v, 1) for k, v in rel.items()}
    assert got == {"none@None": 100.0, "fastv@426": 98.9, "learnpruner@426": 99.3, "fastv@284": 94.7,
                   "learnpruner@284": 98.7, "fastv@142": 72.8, "learnpruner@142": 94.7}  # fmt: skip
    md = sweep.markdown_table(results, benches)
    assert "(the layout of the paper's Table 4)" in md
    assert "| Method | Avg. tokens | GQA | SQA-I | VQA-T | MME | VQAv2 | MMB | RelAcc. |" in md
    assert "| *Upper Bound, 1280 Tokens (100%)* |" in md and "| *Retain Averaged 426 Tokens (↓ 66.7%)* |" in md
    assert "| learnpruner | 142.0 | 51.9 | 76.1 | 70.8 | 2292 | 79.3 | 81.8 | 94.7% |" in md


def test_sweep_takes_the_family_defaults_of_a_qwen_checkpoint(eval_root, tmp_path):
    """A tiny Qwen2.5-VL with no --budgets/--conv-mode: Table 4's budgets (426/284/142, all above the tiny model's
    24 tokens: infeasible rows, not a crash) and the qwen2_5_vl template (a LLaVA template would be refused)."""
    from learnpruner_ext.tiny import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny-qwen", family="qwen2_5_vl")
    out = tmp_path / "sweep"
    results = sweep.main(["--model-path", str(ckpt), "--methods", "none,fastv", "--benchmarks", "pope",
                          "--eval-root", str(eval_root), "--out", str(out), "--max-new-tokens", "2", "--batch-size",
                          "3", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert results["budgets"] == [426, 284, 142] and results["conv_mode"] == "qwen2_5_vl"
    status = {(r["method"], r["budget"]): r["status"] for r in results["rows"]}
    assert status == {("none", None): "ok", ("fastv", 426): "infeasible", ("fastv", 284): "infeasible",
                      ("fastv", 142): "infeasible"}  # fmt: skip
    answers = [json.loads(line) for line in open(out / "answers" / "pope" / "tiny-qwen-none-full" / "answers.jsonl")]
    assert answers and answers[0]["metadata"]["settings"]["conv_mode"] == "qwen2_5_vl"
    assert answers[0]["metadata"]["settings"]["max_pixels"] == 24 * 28 * 28  # the checkpoint's, below the cap


# Table 2 of the paper (LLaVA-NeXT-7B), printed RelAcc last: vanilla and three methods at 640 / 320 / 160 tokens
PAPER_TABLE2 = {
    ("none", None): ([64.2, 70.2, 61.3, 1842, 81.2, 67.9], 100.0),
    ("divprune", 640): ([61.9, 67.8, 57.0, 1760, 79.3, 65.8], 96.0),
    ("learnpruner", 640): ([63.8, 70.0, 60.5, 1837, 80.5, 67.5], 99.3),
    ("visionzip", 320): ([59.3, 67.3, 58.9, 1702, 76.2, 63.1], 93.9),
    ("learnpruner", 320): ([62.2, 68.6, 58.4, 1845, 78.3, 66.8], 97.5),
    ("divprune", 160): ([59.3, 67.1, 54.1, 1643, 75.0, 62.9], 91.7),
    ("learnpruner", 160): ([58.7, 67.6, 55.0, 1784, 76.2, 65.3], 94.0),
}  # fmt: skip


def test_relacc_reproduces_paper_table2():
    """LLaVA-NeXT's table (2880 tokens, six columns): the mean of per-benchmark ratios gives each printed RelAcc to
    its rounding (e.g. LearnPruner @ 160: mean(58.7/64.2, 67.6/70.2, 55.0/61.3, 1784/1842, 76.2/81.2, 65.3/67.9)
    = mean(0.9143, 0.9630, 0.8972, 0.9685, 0.9384, 0.9617) = 94.053%, printed 94.0%: the one value off by more
    than rounding, by 0.053; every other row is within 0.05)."""
    table = sweep.FAMILY_TABLES["llava_next"]
    assert (table.table, table.budgets) == ("Table 2", "640,320,160")
    benches = [B.BENCHMARKS[n] for n in table.benchmarks]
    rows = [{"method": m, "budget": b, "benchmark": name, "status": "ok", "value": v}
            for (m, b), (values, _) in PAPER_TABLE2.items() for name, v in zip(table.benchmarks, values)]  # fmt: skip
    rel = sweep.relative_accuracy(rows, benches)
    for (m, b), (_, printed) in PAPER_TABLE2.items():
        assert rel[f"{m}@{b}"] == pytest.approx(printed, abs=0.06), (m, b)  # 94.053 vs 94.0: the one gap


def test_vision_cache_gives_the_uncached_answers(tiny_ckpt, tiny_lpm, eval_root, tmp_path):
    """The same sweep with the vision cache off and on: every answer line (less the random answer_id) is
    identical; the cached sweep's later runs hit the cache (jobs.json), the uncached one records none."""
    def run(out, cache_gb):
        sweep.main(["--model-path", str(tiny_ckpt), "--methods", "none,learnpruner,random,vispruner", "--budgets", "8",
                    "--benchmarks", "pope,sqa", "--eval-root", str(eval_root), "--out", str(out), "--lpm-path",
                    str(tiny_lpm), "--max-new-tokens", "3", "--batch-size", "4", "--device", "cpu", "--no-progress",
                    "--vision-cache-gb", cache_gb])  # fmt: skip
        lines = {str(p.relative_to(out)): [{k: v for k, v in json.loads(x).items() if k != "answer_id"}
                                           for x in p.read_text().splitlines()]
                 for p in sorted((out / "answers").rglob("answers.jsonl"))}  # fmt: skip
        return lines, json.loads((out / "jobs.json").read_text())["jobs"]

    plain, plain_jobs = run(tmp_path / "plain", "0")
    cached, cached_jobs = run(tmp_path / "cached", "2")
    assert cached == plain and len(plain) == 8 and all(plain.values())
    assert all("vision_cache" not in j for j in plain_jobs)
    hits = {(j["method"], j["bench"]): j["vision_cache"]["hits"] for j in cached_jobs}
    assert hits[("none", "pope")] == 0 and hits[("none", "sqa")] == 0  # the first run computes the tower
    assert all(h > 0 for (m, _), h in hits.items() if m != "none")


def test_sweep_on_an_original_llava_folder_reads_n_from_the_model(eval_root, tmp_path):
    """An original-format (liuhaotian-style) folder: the table's N is the loaded model's 16 vision tokens (a
    config-only reading gave CLIP's default 576 for this layout)."""
    from learnpruner_ext.tiny import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny-orig", "llava", seed=0, text_layers=4, image_size=56, patch_size=14)
    out = tmp_path / "sweep"
    results = sweep.main(["--model-path", str(ckpt), "--methods", "none,random", "--budgets", "8", "--benchmarks", "pope",
                          "--eval-root", str(eval_root), "--out", str(out), "--max-new-tokens", "2", "--device", "cpu",
                          "--no-progress"])  # fmt: skip
    assert results["num_vision_tokens"] == 16
    assert "Upper Bound, 16 Tokens" in (out / "table.md").read_text()
    assert "Retain Averaged 8 Tokens (↓ 50.0%)" in (out / "table.md").read_text()
