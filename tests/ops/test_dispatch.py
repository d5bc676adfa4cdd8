"""The dispatcher: explicit > FASTCLIP_BACKEND > auto, and refusals that explain themselves."""
import pytest
import torch

from fastclip.ops import clip_loss, dispatch, siglip_loss


@pytest.mark.parametrize("op", ["clip_loss", "siglip_loss"])
def test_auto_on_cpu_picks_chunked(op, monkeypatch):
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b = dispatch.select(op, "auto", device=torch.device("cpu"), dtype=torch.float32)
    assert b.name == "chunked"


def test_auto_never_picks_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    b = dispatch.select("clip_loss", "auto", device=torch.device("cpu"), dtype=torch.float32)
    assert b.name == "chunked"


def test_policy_is_declared_on_every_backend():
    """Automatic selection never considers a test oracle, nor a Triton backend off CUDA (where it
    would run through the interpreter); the policy lives on the Backend record, for every op."""
    import fastclip.ops  # noqa: F401  (registers every op)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for op in dispatch.all_ops():
        for b in dispatch.backends(op):
            if b.name == "reference":
                assert not b.picked_automatically(cpu) and not b.picked_automatically(cuda), (op, b.name)
            if "triton" in b.packages:
                assert not b.picked_automatically(cpu) and b.picked_automatically(cuda), (op, b.name)


def test_triton_backend_shares_the_policy_and_lists_the_ops_reasons_first(monkeypatch):
    b = dispatch.triton_backend(len, faster="other", doc="d", check=lambda head_dim=0, **_: [f"head_dim {head_dim}"],
                                extra={"engine": 1})
    assert (b.name, b.fn, b.doc, b.extra, tuple(b.packages)) == ("triton", len, "d", {"engine": 1}, ("triton",))
    assert tuple(b.dtypes) == (torch.float32, torch.float16, torch.bfloat16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not b.picked_automatically(cpu) and b.picked_automatically(cuda)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert b.check(device=cpu, head_dim=3) == ["head_dim 3"] + dispatch.triton_device_reasons(cpu, faster="other")
    assert "far slower than 'other'" in b.check(device=cpu)[-1]
    assert b.check(device=cuda) == ["head_dim 0"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_backend(len, faster="x", doc="").check(device=cpu) == []


def test_policy_skip_imports_nothing(monkeypatch):
    """A backend the policy or its devices rule out is refused without checking its packages."""
    checked = []
    monkeypatch.setattr(dispatch, "package_status", lambda name: checked.append(name) or None)
    dispatch.register("_policy_test_op", dispatch.Backend("gpu_only", lambda: None, devices=("cuda",),
                                                          packages=("some_cuda_pkg",)))
    dispatch.register("_policy_test_op", dispatch.Backend("plain", lambda: None, devices=("cpu",)))
    try:
        assert dispatch.select("_policy_test_op", device=torch.device("cpu"), dtype=torch.float32).name == "plain"
        assert checked == []
    finally:
        dispatch._REGISTRY.pop("_policy_test_op")


def test_refusal_starts_with_the_inputs():
    a = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(dispatch.BackendError) as err:
        clip_loss(a, a, 1.0, backend="triton")
    assert str(err.value).startswith("clip_loss with inputs on cpu, float64, shapes (3, 8) and (3, 8): ")
    with pytest.raises(dispatch.BackendError) as err:
        dispatch.select("attention", "auto", device=torch.device("cpu"), dtype=torch.int8, shapes=[(1, 2, 3, 4)],
                        head_dim=4)
    assert str(err.value).startswith("attention with inputs on cpu, int8, shape (1, 2, 3, 4), head_dim=4: "
                                     "no backend can run them")


def test_explicit_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.randn(4, 8)
    with pytest.raises(dispatch.BackendError, match=r"backend 'triton' \(backend=\) cannot run.*TRITON_INTERPRET=1"):
        clip_loss(a, a, 1.0, backend="triton")
    with pytest.raises(dispatch.BackendError, match=r"TRITON_INTERPRET=1"):
        siglip_loss(a, a, 1.0, 0.0, backend="triton")


def test_env_variable_selects_backend(monkeypatch):
    calls = []
    b = dispatch.backends("clip_loss")[[x.name for x in dispatch.backends("clip_loss")].index("reference")]
    orig = b.fn
    monkeypatch.setattr(b, "fn", lambda *a: calls.append(1) or orig(*a))
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    a = torch.randn(4, 8)
    clip_loss(a, a, 1.0)
    assert calls == [1]
    monkeypatch.setenv("FASTCLIP_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"FASTCLIP_BACKEND='bogus' is not a backend of clip_loss"):
        clip_loss(a, a, 1.0)
    # the argument beats the environment
    calls.clear()
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    clip_loss(a, a, 1.0, backend="chunked")
    assert calls == []


def test_dtype_refusal_lists_every_backend():
    a = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(dispatch.BackendError, match=r"supports dtypes float32, float16, bfloat16, got float64"):
        clip_loss(a, a, 1.0, backend="triton")


def test_no_backend_message_lists_all_reasons(monkeypatch):
    reg = "_test_only_op"
    monkeypatch.setitem(dispatch._REGISTRY, reg, [])  # removed again after the test
    dispatch.register(reg, dispatch.Backend("a", lambda: None, devices=("cuda",)))
    dispatch.register(reg, dispatch.Backend("b", lambda: None, packages=("surely_not_a_package_xyz",)))
    with pytest.raises(dispatch.BackendError) as exc:
        dispatch.select(reg, device=torch.device("cpu"), dtype=torch.float32)
    msg = str(exc.value)
    assert "a: runs on cuda, inputs are on cpu" in msg
    assert "b: cannot import surely_not_a_package_xyz" in msg
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register(reg, dispatch.Backend("a", lambda: None))


def test_env_flag(monkeypatch):
    from fastclip.ops.dispatch import env_flag
    cases = (("1", True), ("Yes", True), (" on ", True), ("0", False), ("FALSE", False), ("off", False))
    for value, want in cases:
        monkeypatch.setenv("FASTCLIP_TEST_FLAG", value)
        assert env_flag("FASTCLIP_TEST_FLAG", not want) is want
    for value in ("", "maybe"):
        monkeypatch.setenv("FASTCLIP_TEST_FLAG", value)
        assert env_flag("FASTCLIP_TEST_FLAG", True) is True and env_flag("FASTCLIP_TEST_FLAG", False) is False
    monkeypatch.delenv("FASTCLIP_TEST_FLAG")
    assert env_flag("FASTCLIP_TEST_FLAG", True) is True


@pytest.mark.parametrize("op", ["clip_loss", "siglip_loss"])
def test_every_loss_backend_declares_its_distributed_engine(op):
    """One table: each registered loss backend carries the engine the distributed loss runs (None
    for the materialised reference), so a new backend cannot silently run O(N^2) across ranks."""
    from fastclip.ops import dispatch
    from fastclip.ops.distributed_loss import distributed_engine
    for b in dispatch.backends(op):
        assert "engine" in b.extra, f"{op} backend {b.name!r} declares no distributed engine"
        assert (b.extra["engine"] is None) == (b.name == "reference")
    assert distributed_engine(op, "chunked", torch.device("cpu"), torch.float32) is \
        next(b for b in dispatch.backends(op) if b.name == "chunked").extra["engine"]


def test_a_backend_without_a_distributed_engine_is_refused(monkeypatch):
    from fastclip.ops import dispatch
    from fastclip.ops.distributed_loss import distributed_engine
    chunked = next(b for b in dispatch.backends("clip_loss") if b.name == "chunked")
    monkeypatch.setattr(chunked, "extra", {})
    with pytest.raises(dispatch.BackendError, match="declares no engine for the distributed loss"):
        distributed_engine("clip_loss", "chunked", torch.device("cpu"), torch.float32)
