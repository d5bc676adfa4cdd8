"""benchmarks/profile_step.py on CPU in --quick mode: every section runs and the record (JSON and
markdown) has the layout the report reads.  Timings are not checked (they mean nothing here)."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("fastclip_profile_step", ROOT / "benchmarks" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


profile_step = _load()


def test_quick_run_writes_the_record(tmp_path):
    rec = profile_step.measure(quick=True, backends=("pil",), log=lambda *a: None)
    j, md = profile_step.write(rec, tmp_path)
    assert j.name == "profile-step-cpu-quick.json" and md.name == "profile-step-cpu-quick.md"
    data = json.loads(j.read_text())
    for key in ("machine", "matmul_rate", "steps", "loader_alone", "augment_op", "loss", "loss_share_of_demo_step",
                "profile", "verdicts", "decision_rule", "threshold"):
        assert key in data, key
    assert data["quick"] is True
    assert data["matmul_rate"]["start"]["gflops"] > 0
    demo = data["steps"][0]
    assert demo["label"] == "demo" and demo["image_size"] == 32 and demo["strategy"] == "clip"
    assert demo["memory"]["median_s"] > 0
    assert set(demo["loaders"]) == {"pil"}
    assert "loader_share" in demo["loaders"]["pil"]
    assert {"pil/native", "pil/torch"} <= set(data["loader_alone"])
    assert [(x["n"], x["d"]) for x in data["loss"]] == list(profile_step.LOSS_SHAPES["quick"])
    for x in data["loss"]:
        assert x["loss"]["median_s"] > 0 and x["matmuls"]["median_s"] > 0
        assert abs(x["elementwise_share"] - (x["tile_elementwise_share"] + x["overhead_share"])) < 1e-9
        assert x["loss_torch_tiles"]["median_s"] > 0
        nt = x["native_tiles"]
        if nt["loaded"]:  # the native tiles against the torch tiles, the same rounds
            assert len(nt["speedup_per_round"]) == profile_step.settings(True)["loss_rounds"]
            assert nt["speedup_min"] <= nt["speedup_median"] <= nt["speedup_max"]
            assert x["tile_elementwise_native"]["median_s"] > 0
        else:
            assert nt["reason"]
    groups = data["profile"]["groups"]
    assert set(groups) == {"matmul", "elementwise", "softmax_layernorm", "optimizer", "other"}
    assert abs(sum(g["share"] for g in groups.values()) - 1) < 1e-6
    assert 0 < len(data["profile"]["top_ops"]) <= 15
    lines = [v["line"] for v in data["verdicts"]]
    assert lines[0].startswith("loader per-sample work: ") and "% of the step (threshold 5%" in lines[0]
    assert all(ln.startswith("loss elementwise tile work: ") and "% of the loss time (threshold 5%" in ln
               for ln in lines[1:])
    text = md.read_text()
    assert ("native tiles (csrc/loss_tiles_cpu.cpp): loss " in lines[1]) == data["loss"][0]["native_tiles"]["loaded"]
    assert "### The native tiles" in text
    assert "## Verdicts" in text and "Decision rule" in text and "torch.profiler" in text


def test_classify_groups_ops():
    c = profile_step.classify
    assert c("aten::mm", False) == "matmul"
    assert c("aten::_scaled_dot_product_flash_attention_for_cpu_backward", False) == "matmul"
    assert c("aten::native_layer_norm_backward", False) == "softmax_layernorm"
    assert c("aten::gelu_backward", False) == "elementwise"
    assert c("aten::mul_", True) == "optimizer"
    assert c("aten::_foreach_mul_", False) == "optimizer"
    assert c("aten::view", False) == "other"


def test_the_loss_section_without_the_extension(monkeypatch):
    """FASTCLIP_NATIVE=0: the torch tiles only, and the reason in the record."""
    from fastclip import extension

    monkeypatch.setenv("FASTCLIP_NATIVE", "0")
    extension.reset()
    try:
        rec = profile_step.time_loss(64, 16, rounds=2, target_s=0.001)
    finally:
        monkeypatch.delenv("FASTCLIP_NATIVE")
        extension.reset()
    assert rec["native_tiles"] == {"loaded": False, "reason": rec["native_tiles"]["reason"]}
    assert "FASTCLIP_NATIVE=0" in rec["native_tiles"]["reason"]
    assert rec["loss"] is rec["loss_torch_tiles"] and "tile_elementwise_native" not in rec
