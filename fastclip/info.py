"""``python -m fastclip.info``: versions, the device, and every backend of every op with the reason
it cannot run here (if it cannot)."""
from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

from . import __version__
from .ops import dispatch

_PACKAGES = ("torch", "numpy", "triton", "tokenizers", "ftfy", "regex", "PIL", "flash_attn", "xformers",
             "nvidia.dali", "open_clip")


def _version(name: str) -> str:
    why = dispatch.package_status(name)
    if why:
        return f"not usable ({why})"
    mod = importlib.import_module(name)
    return str(getattr(mod, "__version__", "installed"))


def _devices() -> list[tuple[torch.device, str]]:
    out = [(torch.device("cpu"), f"{platform.processor() or platform.machine()}, "
                                 f"{torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append((torch.device("cuda", i), f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
    return out


def report() -> str:
    lines = [f"fastclip {__version__}", f"python {sys.version.split()[0]} on {platform.platform()}"]
    lines += [f"  {name:12s} {_version(name)}" for name in _PACKAGES]
    lines.append(f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}  "
                 f"FASTCLIP_BACKEND={os.environ.get('FASTCLIP_BACKEND', '')!r}")
    if not torch.cuda.is_available():
        lines.append("  cuda: not available (torch.cuda.is_available() is False)")
    for device, desc in _devices():
        lines.append(f"\ndevice {device}: {desc}")
        for op in dispatch.all_ops():
            lines.append(f"  {op}:")
            for b in dispatch.backends(op):
                dtypes = [d for d in b.dtypes if d != torch.float64]
                usable = {d: b.reasons(device=device, dtype=d) for d in dtypes}
                ok = [str(d).replace("torch.", "") for d, r in usable.items() if not r]
                if ok:
                    lines.append(f"    {b.name:10s} usable ({', '.join(ok)})  {b.doc}")
                else:
                    reasons = sorted({"; ".join(r) for r in usable.values()})
                    lines.append(f"    {b.name:10s} not usable: {' | '.join(reasons)}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
