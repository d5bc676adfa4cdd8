"""fastclip.eval.common: eval_mode, model_device / model_dtype, autocast_context and iterate_batches."""
import types

import pytest
import torch
from torch import nn

from fastclip.eval import common
from fastclip.eval.common import autocast_context, eval_mode, iterate_batches, model_device, model_dtype


def test_eval_mode_restores_every_submodules_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Linear(2, 2)))
    model[2].eval()  # a frozen tower kept in eval mode by the trainer
    before = [m.training for m in model.modules()]
    with eval_mode(model) as m:
        assert m is model and not any(x.training for x in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before, "restored on an error too"


def test_model_device():
    assert model_device(nn.Linear(2, 2), "meta") == torch.device("meta")  # an explicit device wins
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    buffers_only = nn.BatchNorm1d(3, affine=False).to("meta")
    assert model_device(buffers_only) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # nothing to ask: CPU


def test_model_dtype():
    assert model_dtype(nn.Linear(2, 2).to(torch.bfloat16)) == torch.bfloat16
    model = nn.Module()
    model.ids = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    model.proj = nn.Linear(2, 2, dtype=torch.float64)
    assert model_dtype(model) == torch.float64  # the first floating parameter
    assert model_dtype(nn.ReLU()) is None


def test_autocast_context():
    cpu = torch.device("cpu")
    with autocast_context(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    for bad in (torch.float32, torch.int8, "bf16"):
        with pytest.raises(ValueError, match=r"^autocast_dtype must be None, torch.float16 or torch.bfloat16, got"):
            autocast_context(cpu, bad)


def counting_source(n, produced, closed):
    """A generator of n batches that records what it produced and whether it was closed."""
    try:
        for i in range(n):
            produced.append(i)
            yield i
    finally:
        closed.append(True)


def test_iterate_batches_takes_the_first_max_batches():
    with iterate_batches([0, 1, 2, 3, 4], max_batches=3) as batches:
        assert list(batches) == [0, 1, 2]
    with iterate_batches([0, 1, 2]) as batches:
        assert list(batches) == [0, 1, 2]


def test_iterate_batches_reads_no_batch_beyond_the_limit_and_closes_the_source():
    produced, closed = [], []
    with iterate_batches(counting_source(10, produced, closed), max_batches=2) as batches:
        assert list(batches) == [0, 1]
    assert produced == [0, 1] and closed == [True]
    produced, closed = [], []
    with iterate_batches(counting_source(10, produced, closed)) as batches:
        next(iter(batches))  # the caller leaves early
    assert produced == [0] and closed == [True]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_iterate_batches_refuses_a_bad_limit(bad):
    with pytest.raises(ValueError, match=r"^max_batches must be None or a positive int, got"), \
            iterate_batches([1, 2], max_batches=bad):
        pass


def test_progress_bar_gets_the_total_and_is_closed(monkeypatch):
    bars = []

    class Bar:
        def __init__(self, source, total, desc, leave):
            self.source, self.total, self.desc, self.closed = source, total, desc, False
            bars.append(self)

        def __iter__(self):
            return iter(self.source)

        def close(self):
            self.closed = True

    monkeypatch.setattr(common, "optional_module", lambda name: (types.SimpleNamespace(tqdm=Bar), None))
    with iterate_batches([1, 2, 3, 4], max_batches=3, progress=True, desc="zero-shot") as batches:
        assert list(batches) == [1, 2, 3]
    with iterate_batches(counting_source(5, [], []), max_batches=2, progress=True) as batches:
        assert list(batches) == [0, 1]
    with iterate_batches([1, 2], progress=True) as batches:
        assert list(batches) == [1, 2]
    assert [(b.total, b.closed) for b in bars] == [(3, True), (2, True), (2, True)]
    assert bars[0].desc == "zero-shot"


def test_progress_without_tqdm_is_just_the_batches(monkeypatch):
    monkeypatch.setattr(common, "optional_module", lambda name: (None, f"cannot import {name}"))
    with iterate_batches([1, 2, 3], max_batches=2, progress=True) as batches:
        assert list(batches) == [1, 2]
