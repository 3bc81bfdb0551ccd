"""playground/data/eval/ is upstream LLaVA's layout, and its READMEs say what the code reads."""

import os

from llava.eval import layout
from llava.eval.benchmarks import BENCHMARKS, ORDER
from minibench import ROOT


def test_committed_readmes_match_the_benchmark_registry(capsys):
    """Every Table-1 benchmark has playground/data/eval/<folder>/README.md, identical to what layout writes."""
    root = os.path.join(ROOT, layout.DEFAULT_ROOT)
    assert layout.main(["--root", root, "--check"]) == 0, capsys.readouterr().out
    for name in ORDER:
        bench = BENCHMARKS[name]
        text = open(os.path.join(root, bench.folder, "README.md"), encoding="utf-8").read()
        for path in [bench.question_file, *([bench.image_folder] if bench.image_folder else []), *bench.required]:
            assert f"`{path}" in text, (name, path)
        assert f"scripts/v1_5/eval/{name}.sh" in text and os.path.isfile(os.path.join(ROOT, "scripts/v1_5/eval", f"{name}.sh"))


def test_check_reports_a_stale_readme(tmp_path, capsys):
    assert layout.main(["--root", str(tmp_path)]) == 0  # writes them
    (tmp_path / "pope" / "README.md").write_text("old\n")
    assert layout.main(["--root", str(tmp_path), "--check"]) == 1
    assert "pope/README.md" in capsys.readouterr().out
