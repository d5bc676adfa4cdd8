"""Real processes: ``kill -9`` mid-run then ``--resume latest`` reproduces the uninterrupted loss
curve bit for bit, and 2 torchrun-style gloo ranks x batch b train like 1 process x batch 2b."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastclip.train import TrainConfig
from fastclip.train.metrics import read_metrics

from ._tiny import tiny_model_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_cfg(path, shapes, out, **sections):
    d = {"output_dir": str(out), "model": tiny_model_cfg(),
         "data": {"train": shapes["train"], "batch_size": 32, "num_threads": 1},
         "optim": {"lr": 2e-3, "warmup": 2}, "budget": {"steps": 30},
         "log": {"every_steps": 1, "progress": False, "plot": False},
         "checkpoint": {"every_steps": 5, "every_minutes": 0, "keep": 10}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    TrainConfig.from_dict(d).save(str(path))
    return str(path)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def _train_cmd(cfg, *extra):
    return [sys.executable, "-m", "fastclip.cli", "train", "--config", cfg, *extra]


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"]


def test_kill_9_then_resume_equals_the_uninterrupted_run(shapes, tmp_path):
    straight = _write_cfg(tmp_path / "a.yaml", shapes, tmp_path / "a")
    subprocess.run(_train_cmd(straight), env=_env(), check=True, timeout=600, capture_output=True)
    killed = _write_cfg(tmp_path / "b.yaml", shapes, tmp_path / "b")
    proc = subprocess.Popen(_train_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000010.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # let it run into the next steps: killed mid-epoch, mid-step
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_before = len(_losses(str(tmp_path / "b")))
    assert 10 <= steps_before < 30
    r = subprocess.run(_train_cmd(killed, "--resume", "latest"), env=_env(), timeout=600, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(str(tmp_path / "a")), _losses(str(tmp_path / "b"))
    assert [s for s, _ in b] == list(range(1, 31))
    assert a == b  # bit for bit


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_train_like_one_process_with_twice_the_batch(shapes, tmp_path, accum):
    """accum=2: each rank also accumulates 2 micro-batches (DDP's no_sync, then one all-reduce)."""
    sections = dict(data={"shuffle": 0, "backend": "pil"}, budget={"steps": 5},
                    checkpoint={"every_steps": 0})
    one = _write_cfg(tmp_path / "one.yaml", shapes, tmp_path / "one", **sections)
    subprocess.run(_train_cmd(one), env=_env(), check=True, timeout=600, capture_output=True)
    sections["data"] = dict(sections["data"], accum_steps=accum)
    two = _write_cfg(tmp_path / "two.yaml", shapes, tmp_path / "two", **sections)
    port = str(_free_port())
    procs = [subprocess.Popen(_train_cmd(two), env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                      GLOO_SOCKET_IFNAME="lo"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    import json
    summaries = [json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two")]
    assert [(s["world_size"], s["batch_per_rank"]) for s in summaries] == [(1, 32), (2, 16)]
    a, b = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "two"))
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5]
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    assert a[-1][1] < a[0][1]  # it trains
