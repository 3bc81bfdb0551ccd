"""``llava.eval.sweep --ray``: the same results as a serial sweep, per-job resume, and a killed worker's job
finished from the answers it wrote. A local Ray instance with 2 CPU workers, the shipped toy LLaVA and a toy
test split (``toyworld.generate``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (EXTRAS=...,ray bash scripts/setup_env.sh)")

from llava.eval import sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = 60


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_eval")
    subprocess.run([sys.executable, "-m", "toyworld.generate", "--out", str(root / "toy"), "--seed", "3",
                    "--num-train", "1", "--num-test", str(QUESTIONS)], check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    return root


def flags(toy_root: Path, out: Path, *extra: str) -> list[str]:
    # fastv cannot meet 16 tokens on the 4-layer toy model: an infeasible run, recorded like the serial sweep's
    return ["--model-path", str(ROOT / "checkpoints" / "toy-llava"), "--methods", "none,learnpruner,random,fastv",
            "--budgets", "16", "--benchmarks", "toy", "--eval-root", str(toy_root), "--out", str(out),
            "--batch-size", "1", "--max-new-tokens", "3", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def serial(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "sweep"
    sweep.main(flags(toy_root, out))
    return out


def csv_text(out: Path, as_out: Path) -> str:
    """results.csv with the folder written as ``as_out`` (the answers_file column names it)."""
    return (out / "results.csv").read_text().replace(str(out), str(as_out))


def answer_lines(out: Path) -> dict[str, list[dict]]:
    """Every run's answers.jsonl, in file order, without the random answer_id."""
    return {str(p.relative_to(out)): [{k: v for k, v in json.loads(x).items() if k != "answer_id"}
                                      for x in p.read_text().splitlines()]
            for p in sorted((out / "answers").rglob("answers.jsonl"))}  # fmt: skip


def jobs(out: Path) -> list[dict]:
    return json.loads((out / "jobs.json").read_text())["jobs"]


def test_ray_sweep_equals_the_serial_sweep_and_skips_finished_jobs(ray_local, toy_root, serial, tmp_path):
    """2 workers x 6 chunk jobs (3 feasible runs x 2 chunks) + fastv's infeasible jobs: the merged CSV, table and
    answers equal a serial sweep's; each worker loaded the model once for all its jobs; a re-run sends no job."""
    out = tmp_path / "sweep"
    sweep.main(flags(toy_root, out, "--num-chunks", "2", "--ray", "auto"))
    assert csv_text(out, serial) == (serial / "results.csv").read_text()
    assert (out / "table.md").read_text() == (serial / "table.md").read_text()
    mine, theirs = answer_lines(out), answer_lines(serial)
    assert mine == theirs and sorted(len(v) for v in mine.values()) == [QUESTIONS] * 3
    records = jobs(out)
    answered = [r for r in records if "infeasible" not in r["plan"]]
    assert len(answered) == 6 and {r["generated"] for r in answered} == {QUESTIONS // 2}
    assert sum("infeasible" in r["plan"] for r in records) == 2  # fastv's 2 chunks, nothing answered
    by_worker = {}
    for r in records:
        if "jobs_on_worker" in r:
            by_worker.setdefault(r["worker"], []).append(r["jobs_on_worker"])
    assert 1 <= len(by_worker) <= 2  # two actors, no restart
    for counts in by_worker.values():  # one SweepWorker (one model load) answered all of them, in turn
        assert sorted(counts) == list(range(1, len(counts) + 1))
    assert max(len(c) for c in by_worker.values()) >= 2
    assert sum(r["vision_cache"]["hits"] for r in answered) > 0  # the same chunk's images under another method

    sweep.main(flags(toy_root, out, "--num-chunks", "2", "--ray", "auto"))
    # every answering job was complete: not sent (fastv's are, and are found infeasible again at once)
    assert [(r["method"], r.get("generated")) for r in jobs(out)] == [("fastv", None)] * 2
    assert csv_text(out, serial) == (serial / "results.csv").read_text()


def _writer_of(path: Path) -> int | None:
    """The pid of the SweepWorker process that has ``path`` open (the job answering into it), if any."""
    busy = subprocess.run(["pgrep", "-f", "^ray::SweepWorker"], capture_output=True, text=True).stdout.split()
    for pid in map(int, busy):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in fds):
                return pid
        except OSError:  # the process or the descriptor went away meanwhile
            continue
    return None


def _kill_a_worker_mid_job(out: Path, state: dict) -> None:
    """SIGKILL the SweepWorker that is writing a chunk file once that file has 2..total-2 answers."""
    deadline = time.time() + 120
    while time.time() < deadline and not state.get("stop"):
        for chunk in out.glob("answers/toy/*/chunks/*.jsonl"):
            n = chunk.read_bytes().count(b"\n")
            if 2 <= n <= QUESTIONS // 2 - 2:
                pid = _writer_of(chunk.resolve())
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    state["killed"] = (pid, str(chunk), n)
                    return
        time.sleep(0.01)


def test_a_killed_worker_loses_no_answers_and_duplicates_none(ray_local, toy_root, serial, tmp_path):
    """A worker is SIGKILLed while it answers: Ray restarts it, its job resumes from the answer lines already
    on disk (``already`` > 0), and the merged results equal the serial sweep's, every question once."""
    out = tmp_path / "sweep"
    state = {}
    watcher = threading.Thread(target=_kill_a_worker_mid_job, args=(out, state), daemon=True)
    watcher.start()
    try:
        sweep.main(flags(toy_root, out, "--num-chunks", "2", "--ray", "auto", "--vision-cache-gb", "0"))
    finally:
        state["stop"] = True
        watcher.join()
    assert "killed" in state, "no worker was killed mid-job (the jobs finished too fast?)"
    resumed = [r for r in jobs(out) if r.get("already", 0) > 0]
    assert resumed and all(r["already"] + r["generated"] == r["total"] for r in resumed)
    killed_chunk = Path(state["killed"][1])  # the killed job itself resumed from at least the lines seen
    assert any(f"{r['method']}-{r['budget'] or 'full'}" in str(killed_chunk) and killed_chunk.name ==
               f"{r['num_chunks']}_{r['chunk']}.jsonl" and r["already"] >= state["killed"][2] for r in resumed)
    assert not any(r["worker"].endswith(f":{state['killed'][0]}") for r in resumed)  # a new process finished it
    assert answer_lines(out) == answer_lines(serial)  # none lost, none twice (merge refuses duplicates anyway)
    assert csv_text(out, serial) == (serial / "results.csv").read_text()


def test_worker_shape_follows_the_cluster(toy_root, tmp_path):
    """Workers per cluster: one per GPU on a GPU cluster, CPUs / --ray-cpus-per-worker otherwise, at most one
    per job; a cluster too small for one worker is named, with the fix."""
    from llava.eval import sweep_ray

    args = sweep.build_parser().parse_args(flags(toy_root, tmp_path / "o", "--ray", "auto", "--ray-cpus-per-worker", "4"))
    with pytest.raises(ValueError, match="cannot hold one worker of 4 CPU"):
        sweep_ray.worker_shape(args, {"CPU": 2.0}, jobs=3)
    assert sweep_ray.worker_shape(args, {"CPU": 16.0}, jobs=3) == (4, 0.0, 3)  # at most one worker per job
    gpu = sweep.build_parser().parse_args(flags(toy_root, tmp_path / "o", "--ray", "auto"))
    assert sweep_ray.worker_shape(gpu, {"CPU": 64.0, "GPU": 8.0}, jobs=20) == (1, 1.0, 8)  # one GPU per worker
