"""``python -m fastclip.info``: versions, whether the compiled extension ``fastclip._C`` loaded (and
why not), the device, and every backend of every op with the reason it cannot run here (if it
cannot)."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, extension
from .lazy import optional_module
from .ops import dispatch

_PACKAGES = ("torch", "numpy", "triton", "tokenizers", "ftfy", "regex", "PIL", "flash_attn", "xformers",
             "nvidia.dali", "open_clip")


def _version(name: str) -> str:
    mod, why = optional_module(name)
    if mod is None:
        return f"not usable ({why})"
    return str(getattr(mod, "__version__", "installed"))


def _devices() -> list[tuple[torch.device, str]]:
    out = [(torch.device("cpu"), f"{platform.processor() or platform.machine()}, "
                                 f"{torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append((torch.device("cuda", i), f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
    return out


def report_dict() -> dict:
    """The report as plain data, for logs (the trainer writes it into ``summary.json``):
    ``{"fastclip", "python", "platform", "packages": {name: version or reason}, "extension": {"loaded",
    "reason", "path", "version", "abi", "cpu_isa"} (fastclip.extension.status), "environment",
    "devices": {device: {"description", "ops": {op: {backend: {"usable": [dtypes], "reasons": [...]}}}}}}``."""
    out = {"fastclip": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
           "packages": {name: _version(name) for name in _PACKAGES},
           "extension": extension.status(),
           "environment": {k: os.environ.get(k, "") for k in ("TRITON_INTERPRET", "FASTCLIP_BACKEND")},
           "cuda_available": torch.cuda.is_available(), "devices": {}}
    for device, desc in _devices():
        ops = {}
        for op in dispatch.all_ops():
            ops[op] = {}
            for b in dispatch.backends(op):
                dtypes = [d for d in b.dtypes if d != torch.float64]
                usable = {d: b.reasons(device=device, dtype=d) for d in dtypes}
                ops[op][b.name] = {
                    "usable": [str(d).replace("torch.", "") for d, r in usable.items() if not r],
                    "reasons": sorted({"; ".join(r) for r in usable.values() if r}),
                    "doc": b.doc}
        out["devices"][str(device)] = {"description": desc, "ops": ops}
    return out


def report() -> str:
    d = report_dict()
    lines = [f"fastclip {d['fastclip']}", f"python {d['python']} on {d['platform']}"]
    lines += [f"  {name:12s} {version}" for name, version in d["packages"].items()]
    ext = d["extension"]
    if ext["loaded"]:
        lines.append(f"  {extension.NAME:12s} loaded (fastclip {ext['version']}, ABI {ext['abi']}, "
                     f"kernels at {ext['cpu_isa']}) from {ext['path']}")
    else:
        lines.append(f"  {extension.NAME:12s} not loaded: {ext['reason']} "
                     "(the ops' torch backends run instead)")
    env = d["environment"]
    lines.append(f"  TRITON_INTERPRET={env['TRITON_INTERPRET']!r}  FASTCLIP_BACKEND={env['FASTCLIP_BACKEND']!r}")
    if not d["cuda_available"]:
        lines.append("  cuda: not available (torch.cuda.is_available() is False)")
    for device, dev in d["devices"].items():
        lines.append(f"\ndevice {device}: {dev['description']}")
        for op, backends in dev["ops"].items():
            lines.append(f"  {op}:")
            for name, b in backends.items():
                if b["usable"]:
                    lines.append(f"    {name:10s} usable ({', '.join(b['usable'])})  {b['doc']}")
                else:
                    lines.append(f"    {name:10s} not usable: {' | '.join(b['reasons'])}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
