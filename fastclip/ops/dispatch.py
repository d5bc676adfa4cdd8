"""Backend selection shared by every op.

Each op registers its backends in priority order.  A backend declares what it can run (devices,
dtypes, packages it needs) and may add a custom check; the dispatcher returns the first backend
that fits the inputs, or raises listing every backend's reason for refusing.

Precedence: the ``backend=`` argument, then the ``FASTCLIP_BACKEND`` environment variable, then
automatic selection.  An explicit choice that cannot run raises; automatic selection only picks a
backend that declares itself usable, so it never silently runs something wrong.

The automatic-selection policy is declared on the backend too: ``auto_devices`` lists the device
types on which automatic selection may pick it (a test oracle declares none; a Triton backend only
"cuda", since on CPU it would run through the test interpreter).  A backend skipped by the policy
is not even checked, so a CPU-only machine never imports a CUDA-only package to refuse it.

Every refusal starts with a description of the inputs (device, dtype, shapes and the op's static
properties), then gives each backend's reasons.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..lazy import package_reason

__all__ = ["Backend", "BackendError", "register", "backends", "select", "make_static_chooser", "package_status",
           "all_ops", "describe_inputs", "triton_backend"]

_ENV = "FASTCLIP_BACKEND"


class BackendError(RuntimeError):
    """No backend (or not the requested one) can run these inputs."""


def package_status(name: str) -> Optional[str]:
    """None if ``import name`` works, else the reason it does not (recorded, never raised)."""
    return package_reason(name)


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (any case); else ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def triton_interpreter() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return env_flag("TRITON_INTERPRET", False)


def triton_device_reasons(device: Optional[torch.device], faster: str) -> list[str]:
    """Why a Triton backend cannot run on ``device`` (empty: it can): CPU tensors need the
    interpreter, CUDA tensors need it off.  ``faster``: the backend to prefer on CPU."""
    if device is None:
        return []
    if device.type == "cpu" and not triton_interpreter():
        return [f"CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before triton is first "
                f"imported; it is for testing and far slower than '{faster}')"]
    if device.type == "cuda" and triton_interpreter():
        return ["TRITON_INTERPRET=1 is set: the interpreter cannot run CUDA tensors"]
    return []


@dataclass
class Backend:
    """What a backend can run, and where automatic selection may pick it.

    ``check`` returns extra reasons for specific inputs.  ``auto_devices``: the device types on
    which automatic selection considers this backend (None: every type in ``devices``; ``()``:
    explicit use only).  ``extra`` carries op-specific data, e.g. the loss backends' ``engine``
    that the distributed loss runs."""

    name: str
    fn: Callable
    devices: Sequence[str] = ("cpu", "cuda")
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16)
    packages: Sequence[str] = ()
    check: Optional[Callable[..., list[str]]] = None
    doc: str = ""
    extra: dict = field(default_factory=dict)
    auto_devices: Optional[Sequence[str]] = None

    def picked_automatically(self, device: Optional[torch.device]) -> bool:
        """Whether automatic selection considers this backend for inputs on ``device``."""
        allowed = self.devices if self.auto_devices is None else self.auto_devices
        return bool(allowed) and (device is None or device.type in allowed)

    def reasons(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                **inputs) -> list[str]:
        """Why this backend cannot run inputs on ``device``/``dtype`` (empty list: it can)."""
        out = []
        for pkg in self.packages:
            why = package_status(pkg)
            if why:
                out.append(why)
        if device is not None and device.type not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)}, inputs are on {device.type}")
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"supports dtypes {names}, got {str(dtype).replace('torch.', '')}")
        if not out and self.check is not None:
            out.extend(self.check(device=device, dtype=dtype, **inputs))
        return out


def triton_backend(fn: Callable, *, faster: str, doc: str, check: Optional[Callable[..., list[str]]] = None,
                   extra: Optional[dict] = None) -> Backend:
    """The ``triton`` backend record, with the policy every op's Triton backend shares.

    It runs on CUDA, and on CPU only through the interpreter (:func:`triton_device_reasons`, which
    names ``faster``, the backend to prefer there); automatic selection considers it on CUDA only;
    it needs the ``triton`` package and takes fp32/fp16/bf16.  ``check`` adds the op's own reasons
    for specific inputs, listed before the device's."""
    def reasons(device=None, dtype=None, **inputs) -> list[str]:
        out = [] if check is None else check(device=device, dtype=dtype, **inputs)
        return out + triton_device_reasons(device, faster=faster)

    return Backend("triton", fn, devices=("cuda", "cpu"), packages=("triton",), check=reasons, doc=doc,
                   extra={} if extra is None else extra, auto_devices=("cuda",))


_REGISTRY: dict[str, list[Backend]] = {}


def register(op: str, backend: Backend) -> Backend:
    """Add ``backend`` to ``op``'s list (earlier registrations have priority in automatic mode)."""
    lst = _REGISTRY.setdefault(op, [])
    if any(b.name == backend.name for b in lst):
        raise ValueError(f"backend {backend.name!r} is already registered for op {op!r}")
    lst.append(backend)
    return backend


def backends(op: str) -> list[Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def all_ops() -> list[str]:
    return sorted(_REGISTRY)


def describe_inputs(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                    shapes: Sequence = (), **inputs) -> str:
    """"inputs on cpu, float32, shapes (128, 512) and (128, 512), head_dim=64": how refusals begin."""
    parts = []
    if device is not None:
        parts.append(f"on {device}")
    if dtype is not None:
        parts.append(str(dtype).replace("torch.", ""))
    if shapes:
        parts.append("shape" + ("s " if len(shapes) > 1 else " ")
                     + " and ".join(str(tuple(s)) for s in shapes))
    parts += [f"{k}={v}" for k, v in inputs.items()]
    return "inputs " + ", ".join(parts) if parts else "these inputs"


def select(op: str, backend: Optional[str] = "auto", *, device: Optional[torch.device] = None,
           dtype: Optional[torch.dtype] = None, env: str = _ENV, shapes: Sequence = (), **inputs) -> Backend:
    """Pick the backend for ``op``.

    ``backend``: a backend name, or "auto"/None (then the environment variable ``env`` if set,
    ``FASTCLIP_BACKEND`` by default, else the first backend, in registration order, that the
    policy lets automatic selection consider on ``device`` and that can run the inputs).
    ``shapes`` (the input tensors' shapes) only describe the inputs in messages; ``inputs`` are
    the op's static properties, passed to the backends' checks by keyword.
    Raises :class:`BackendError` with every reason, after a description of the inputs.
    """
    candidates = backends(op)
    names = [b.name for b in candidates]
    requested = backend if backend not in (None, "auto") else os.environ.get(env) or "auto"
    source = "backend=" if backend not in (None, "auto") else f"{env}="
    if requested != "auto":
        if requested not in names:
            raise ValueError(f"{source}{requested!r} is not a backend of {op}; choose one of {names} or 'auto'")
        chosen = candidates[names.index(requested)]
        why = chosen.reasons(device=device, dtype=dtype, **inputs)
        if why:
            raise BackendError(f"{op} with {describe_inputs(device, dtype, shapes, **inputs)}: backend "
                               f"{requested!r} ({source}) cannot run them: " + "; ".join(why))
        return chosen
    refusals = []
    for b in candidates:
        if device is not None and device.type not in b.devices:  # said without importing its packages
            refusals.append(f"  {b.name}: runs on {'/'.join(b.devices)}, inputs are on {device.type}")
            continue
        if not b.picked_automatically(device):
            where = f" on {device.type}" if device is not None else ""
            refusals.append(f"  {b.name}: not chosen automatically{where} ({b.doc or 'explicit use only'})")
            continue
        why = b.reasons(device=device, dtype=dtype, **inputs)
        if not why:
            return b
        refusals.append(f"  {b.name}: " + "; ".join(why))
    raise BackendError(f"{op} with {describe_inputs(device, dtype, shapes, **inputs)}: no backend can run them:\n"
                       + "\n".join(refusals))


def make_static_chooser(op: str, *, maxsize: int = 128, env: str = _ENV) -> Callable[..., str]:
    """A memoised, torch.compile-safe ``choose(backend, device, dtype, shapes=(), **inputs) -> str``
    for ``op``: the name :func:`select` picks (or the error it raises), for ops called once per layer.

    ``inputs`` are the op's static properties (head dims, flags): hashable Python constants,
    passed to the backends' checks by keyword.  Results are cached per (backend, device, dtype,
    inputs, the ``env`` variable, ``TRITON_INTERPRET``), so a change of environment is seen;
    ``shapes`` only describe the inputs when no backend fits and are not part of the key.

    Under torch.compile the selection runs once at trace time through a function Dynamo treats as
    a constant (``torch.compiler.assume_constant_result``), so the dispatch never graph-breaks;
    the inputs must then already be plain constants (specialise SymInts before calling).
    """

    @functools.lru_cache(maxsize=maxsize)
    def cached(backend, device_type, device_index, dtype, env_backend, interpret, **inputs) -> str:
        # env_backend/interpret are part of the key only so that a change of environment is seen.
        device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
        return select(op, backend, device=device, dtype=dtype, env=env, **inputs).name

    def traced(backend: str, device_type: str, device_index: int, dtype_name: str, **inputs) -> str:
        return cached(backend, device_type, device_index, getattr(torch, dtype_name), os.environ.get(env, ""),
                      triton_interpreter(), **inputs)

    # What torch.compiler.assume_constant_result sets (calling it would import torch._dynamo and
    # Triton at fastclip's import): Dynamo runs the function at trace time and keeps its result as
    # a constant.  Its arguments are strings, ints and bools, which Dynamo passes as plain constants.
    traced._dynamo_marked_constant = True

    def choose(backend: Optional[str], device: torch.device, dtype: torch.dtype, shapes: Sequence = (),
               **inputs) -> str:
        key = (backend or "auto", device.type, -1 if device.index is None else device.index)
        if torch.compiler.is_compiling():
            return traced(*key, str(dtype).replace("torch.", ""), **inputs)
        try:
            return cached(*key, dtype, os.environ.get(env, ""), triton_interpreter(), **inputs)
        except BackendError:
            if not shapes:
                raise
        # the same refusal, now with the shapes of these inputs in its description (never cached)
        return select(op, backend, device=device, dtype=dtype, env=env, shapes=shapes, **inputs).name

    return choose
