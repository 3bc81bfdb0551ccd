"""A built wheel holds every package and the data files the code reads next to its modules."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_demo_examples_and_every_package(tmp_path):
    """`pip wheel .`: the demo's example scenes (llava/serve/demo_examples, read by llava.serve.examples) and
    the three packages are inside; a non-editable install would otherwise lose the examples."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    examples = sorted(p.name for p in (ROOT / "llava" / "serve" / "demo_examples").iterdir())
    assert examples and all(f"llava/serve/demo_examples/{name}" in names for name in examples)
    for module in ("llava/eval/sweep_ray.py", "learnpruner_ext/vision_cache.py", "learnpruner_ext/methods/atp.py",
                   "toyworld/generate.py"):  # fmt: skip
        assert module in names
