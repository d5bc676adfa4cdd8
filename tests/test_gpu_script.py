"""benchmarks/gpu.sh and its driver benchmarks/gpu_run.py, on CPU: arguments, the plan, the summary,
budgets and timeouts (with fake steps), and that without CUDA every GPU step is skipped quickly."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
STEP_NAMES = ["gpu-tests", "loss", "attention", "data", "train", "budget", "triton-tests"]


def _load():
    spec = importlib.util.spec_from_file_location("fastclip_gpu_run", ROOT / "benchmarks" / "gpu_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


gpu_run = _load()
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="checks the run on a machine without CUDA")


def _py(code: str) -> list:
    return [sys.executable, "-c", code]


def _fake(name, code, **kw):
    kw.setdefault("needs_cuda", False)
    return gpu_run.Step(name, f"fake {name}", _py(code), **kw)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        gpu_run.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_out_dir_is_required(capsys):
    assert "the following arguments are required: OUT_DIR" in _error(capsys, [])
    assert "the following arguments are required: OUT_DIR" in _error(capsys, ["--dry-run"])


def test_unknown_only_steps_name_the_valid_ones(capsys):
    err = _error(capsys, ["out", "--only", "loss,nope,attn"])
    assert "--only: unknown step(s) ['nope', 'attn']" in err
    assert f"valid steps: {', '.join(STEP_NAMES)}" in err
    assert "--only: unknown step(s)" in _error(capsys, ["out", "--only", ","])
    assert gpu_run.parse_args(["out", "--only", " loss , train"]).only == ["loss", "train"]


@pytest.mark.parametrize("budget", ["0", "-5", "nan"])
def test_budget_must_be_positive(capsys, budget):
    err = _error(capsys, ["out", f"--budget-s={budget}"])
    assert "--budget-s must be a positive number of seconds, got" in err


def test_default_budget():
    args = gpu_run.parse_args(["out"])
    assert args.budget_s == 450 and args.only is None and not args.dry_run


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
def test_dry_run_lists_every_step_with_its_command(tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu_run.main([str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for step in gpu_run.build_steps(out):
        assert f"  {step.name} " in text and step.command() in text, step.name
    assert "within 450 s" in text
    assert not out.exists(), "--dry-run must not write anything"


def test_dry_run_only_and_budget(tmp_path, capsys):
    assert gpu_run.main([str(tmp_path), "--dry-run", "--only", "train,loss", "--budget-s", "100"]) == 0
    text = capsys.readouterr().out
    assert "plan: 2 step(s) within 100 s" in text
    assert "test_loss_bench.py" in text and "test_train_bench.py" in text
    assert "test_attention_bench" not in text


def test_steps_select_the_gpu_figures(tmp_path):
    steps = {s.name: s for s in gpu_run.build_steps(tmp_path)}
    assert list(steps) == STEP_NAMES
    assert all(s.needs_cuda for s in steps.values())
    assert steps["gpu-tests"].argv[-3:] == ["tests", "-m", "gpu"]
    loss = steps["loss"].command()
    for part in ("--bench-devices cuda", "--bench-sizes 65536", "--bench-providers triton,chunked",
                 "-k 'bfloat16 and D768'", f"--benchmark-json {tmp_path.resolve() / 'loss.json'}"):
        assert part in loss
    assert "--bench-providers triton,flash_attn,xformers,sdpa" in steps["attention"].command()
    assert "--bench-providers pil,dali-mixed" in steps["data"].command()
    assert steps["train"].env == {"FASTCLIP_BENCH_TRAIN_CASES": "ViT-B-16@224:256",
                                  "FASTCLIP_BENCH_STRATEGIES": "clip"}
    assert steps["train"].command().startswith("FASTCLIP_BENCH_TRAIN_CASES=ViT-B-16@224:256 ")
    assert steps["budget"].requires == "benchmarks/test_budget_bench.py"
    for s in steps.values():
        assert s.outputs[-1] == f"{s.name}.log" and s.outputs[0].startswith(s.name)


def test_collect_only_selects_the_planned_cases(tmp_path):
    """The selections (options, -k, environment) still pick the cases they are meant to (no GPU needed)."""
    assert gpu_run.main([str(tmp_path), "--collect-only", "--only", "loss,train", "--budget-s", "120"]) == 0
    steps = {s["name"]: s for s in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert steps["loss"]["detail"]["cases"] == 12, "CLIP + SigLIP x triton, chunked x fwd, bwd, fwd+bwd"
    assert steps["train"]["detail"]["cases"] == 2, "ViT-B-16 CLIP step + the targets record"
    assert "--collect-only" in steps["loss"]["command"] and "--benchmark-json" not in steps["loss"]["command"]


# ----------------------------------------------------------------------------------------------
# The run on this CPU machine
# ----------------------------------------------------------------------------------------------
@needs_no_cuda
def test_without_cuda_every_step_is_skipped_quickly(tmp_path):
    out = tmp_path / "gpu-out"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 60
    summary = json.loads((out / "summary.json").read_text())
    assert {"machine", "steps", "total_seconds"} <= set(summary)
    assert summary["machine"]["cuda_available"] is False and "torch" in summary["machine"]
    assert [s["name"] for s in summary["steps"]] == STEP_NAMES
    for s in summary["steps"]:
        assert {"name", "command", "status", "reason", "seconds", "outputs"} <= set(s)
        assert s["status"] == "skipped" and s["reason"].startswith(gpu_run.NO_CUDA), s
        assert s["outputs"] == [] and s["seconds"] == 0.0 and "python" in s["command"]
    assert summary["total_seconds"] < 60
    assert gpu_run.NO_CUDA in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_cuda_reason_says_what_is_missing():
    assert gpu_run.cuda_reason({"cuda_available": True}) is None
    assert "CPU-only build" in gpu_run.cuda_reason({"torch": "2.13.0+cpu", "torch_cuda": None})
    why = gpu_run.cuda_reason({"torch_error": "ModuleNotFoundError: No module named 'torch'"})
    assert why.startswith(gpu_run.NO_CUDA) and "torch does not import" in why


# ----------------------------------------------------------------------------------------------
# Running steps: timeouts, failures, budget
# ----------------------------------------------------------------------------------------------
def test_a_step_past_its_timeout_is_recorded_and_the_next_one_runs(tmp_path):
    steps = [
        _fake("slow", "import time; print('started', flush=True); time.sleep(60)", max_s=1.0),
        # ignores SIGINT: killed after the grace period
        _fake("stubborn", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)",
              max_s=1.0),
        _fake("next", "print('next ran')"),
    ]
    t0 = time.monotonic()
    summary = gpu_run.run_steps(steps, tmp_path, 300, kill_grace_s=1.0, log=lambda msg: None)
    assert time.monotonic() - t0 < 20
    slow, stubborn, nxt = summary["steps"]
    assert slow["status"] == "timeout" and "1 s timeout" in slow["reason"] and slow["seconds"] < 10
    assert "SIGKILL" not in slow["reason"] and "started" in (tmp_path / "slow.log").read_text()
    assert stubborn["status"] == "timeout" and "SIGKILL" in stubborn["reason"]
    assert nxt["status"] == "ok" and nxt["returncode"] == 0 and nxt["outputs"] == ["next.log"]
    assert "next ran" in (tmp_path / "next.log").read_text()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in on_disk["steps"]] == ["timeout", "timeout", "ok"]


def test_sigterm_stops_the_run_and_the_summary_says_so(tmp_path):
    """gpu.sh's outer timeout sends SIGTERM: the running step is stopped, the rest recorded as not run."""
    steps = [_fake("stops", "import os, signal, time; os.kill(os.getppid(), signal.SIGTERM); time.sleep(30)"),
             _fake("after", "pass")]
    previous = signal.signal(signal.SIGTERM, gpu_run._on_sigterm)
    try:
        t0 = time.monotonic()
        summary = gpu_run.run_steps(steps, tmp_path, 120, log=lambda m: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert time.monotonic() - t0 < 15
    stops, after = summary["steps"]
    assert stops["status"] == "timeout" and "the whole run was stopped (signal 15)" in stops["reason"]
    assert after["status"] == "skipped" and after["reason"].startswith("not run: the whole run was stopped")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][1]["status"] == "skipped"


def test_a_stopped_benchmark_keeps_the_cases_that_finished(tmp_path):
    """benchmarks/conftest.py: after the timeout's SIGINT, pytest-benchmark still writes its JSON, with
    the finished cases and the interrupted one named (pytest-benchmark alone writes nothing)."""
    shutil.copy(ROOT / "benchmarks" / "conftest.py", tmp_path / "conftest.py")
    marker = tmp_path / "third-case-started"
    (tmp_path / "test_fake_bench.py").write_text(
        "import pathlib, time, pytest\n"
        "@pytest.mark.parametrize('i', range(3))\n"
        "def test_case(benchmark, i):\n"
        "    def run():\n"
        "        if i == 2:\n"
        f"            pathlib.Path({str(marker)!r}).touch()\n"
        "            time.sleep(60)\n"
        "    benchmark.pedantic(run, rounds=1, iterations=1)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fake_bench.py",
            "--benchmark-json", str(tmp_path / "out.json")]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gpu_run._kill_group(proc, 30.0) == "SIGINT"
    data = json.loads((tmp_path / "out.json").read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["test_case[0]", "test_case[1]"]
    assert [n.split("::")[-1] for n in data["fastclip"]["interrupted"]] == ["test_case[2]"]


def test_failures_and_gates_are_recorded(tmp_path):
    steps = [
        _fake("fails", "raise SystemExit(3)"),
        _fake("gpu", "pass", needs_cuda=True),
        _fake("unwritten", "pass", requires="benchmarks/test_nothing_here_bench.py"),
        _fake("no-package", "pass", needs=("pytest_benchmark",)),
        _fake("fine", "pass"),
    ]
    machine = {"packages": {"pytest_benchmark": "missing (ModuleNotFoundError: No module named ...)"}}
    summary = gpu_run.run_steps(steps, tmp_path, 120, machine=machine, cuda_why=gpu_run.NO_CUDA,
                                log=lambda m: None)
    rec = {s["name"]: s for s in summary["steps"]}
    assert rec["fails"]["status"] == "failed" and rec["fails"]["reason"].startswith("exit status 3")
    assert rec["gpu"]["status"] == "skipped" and rec["gpu"]["reason"] == gpu_run.NO_CUDA
    assert rec["unwritten"]["status"] == "skipped"
    assert rec["unwritten"]["reason"].startswith("not written yet")
    assert rec["no-package"]["status"] == "failed"
    assert "pytest_benchmark is missing" in rec["no-package"]["reason"]
    assert rec["fine"]["status"] == "ok"
    assert all(s["status"] in gpu_run.STATUSES for s in summary["steps"])


def test_timeouts_are_shares_of_the_budget_left(tmp_path):
    steps = [_fake("a", "pass", weight=1.0), _fake("b", "pass", weight=3.0)]
    summary = gpu_run.run_steps(steps, tmp_path, 100, kill_grace_s=0.0, log=lambda m: None)
    a, b = summary["steps"]
    assert a["timeout_s"] == pytest.approx(25, abs=1)
    assert b["timeout_s"] == pytest.approx(100 - a["seconds"], abs=2), "a's unused time goes to b"
    spent = gpu_run.run_steps(steps, tmp_path, 4, log=lambda m: None)
    assert [s["status"] for s in spent["steps"]] == ["skipped", "skipped"]
    assert spent["steps"][0]["reason"].startswith("time budget spent")


def test_records_are_read_back(tmp_path):
    step = gpu_run.Step("bench", "fake", _py("pass"), outputs=("bench.json", "bench.log"),
                        needs_cuda=False)
    (tmp_path / "bench.log").write_text("1 skipped\n")
    skipped = {"benchmarks": [], "fastclip": {
        "skipped": [{"nodeid": "b.py::test[x]", "reason": "DALI not usable: no module"}], "matmul_rates": {}}}
    (tmp_path / "bench.json").write_text(json.dumps(skipped))
    status, reason, detail = gpu_run.judge(step, 0, tmp_path)
    assert status == "skipped" and reason == "every case skipped: DALI not usable: no module"
    ran = {"benchmarks": [{"name": "test[y]", "stats": {"median": 0.5},
                           "extra_info": {"ratio_to_floor": 1.2, "tflops": 300.0, "unrelated": 1}}],
           "fastclip": {"skipped": [], "matmul_rates": {
               "cuda/bfloat16/D=768": {"start": {"gflops": 7e5}, "end": {"gflops": 6.9e5}}}}}
    (tmp_path / "bench.json").write_text(json.dumps(ran))
    status, reason, detail = gpu_run.judge(step, 0, tmp_path)
    assert status == "ok" and reason is None
    assert detail["results"] == [{"name": "test[y]", "median_s": 0.5, "ratio_to_floor": 1.2, "tflops": 300.0}]
    assert detail["matmul_rates"]["cuda/bfloat16/D=768"] == {"start_gflops": 7e5, "end_gflops": 6.9e5}

    tests = gpu_run.Step("t", "fake", [sys.executable, "-m", "pytest"], outputs=("t.xml", "t.log"),
                         needs_cuda=False)
    (tmp_path / "t.log").write_text("FAILED tests/x.py::test_a - boom\n1 failed, 1 passed\n")
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.x" name="test_a"><failure message="boom"/></testcase>'
        '<testcase classname="tests.x" name="test_b"/></testsuite></testsuites>')
    status, reason, detail = gpu_run.judge(tests, 1, tmp_path)
    assert status == "failed" and reason == "exit status 1 (some tests failed): 1 failed, 1 passed"
    assert detail["failed_tests"] == [{"test": "tests.x::test_a", "message": "boom"}] and detail["tests"] == 2
    assert detail["failed_lines"] == ["FAILED tests/x.py::test_a - boom"]


# ----------------------------------------------------------------------------------------------
# gpu.sh
# ----------------------------------------------------------------------------------------------
def test_gpu_sh_is_executable_and_passes_its_arguments_through(tmp_path):
    assert os.access(SCRIPT, os.X_OK), "benchmarks/gpu.sh must be executable (chmod +x)"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out), "--only", "loss"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "plan: 1 step(s) within 450 s" in proc.stdout and f"{out.resolve()}/loss.json" in proc.stdout
    assert not out.exists(), "a dry run installs and writes nothing"
    proc = subprocess.run(["bash", str(SCRIPT), "rel-out", "--dry-run"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path.resolve()}/rel-out/loss.json" in proc.stdout, "OUT_DIR is relative to the caller's cwd"
    # argument errors come from the driver, before any install
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "OUT_DIR" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--only", "nope"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "valid steps: gpu-tests" in proc.stderr and not out.exists()
