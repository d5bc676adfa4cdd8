import subprocess
import sys

import fastclip


def test_info_reports_every_backend_with_reasons():
    out = subprocess.run([sys.executable, "-m", "fastclip.info"], capture_output=True, text=True, check=True,
                         env={"PATH": "", "TRITON_INTERPRET": "0"}).stdout
    assert f"fastclip {fastclip.__version__}" in out
    assert "torch" in out and "device cpu" in out
    for op in ("clip_loss", "siglip_loss"):
        assert f"{op}:" in out
    assert "chunked    usable" in out
    assert "triton     not usable:" in out and "TRITON_INTERPRET=1" in out
    assert "flash_attn" in out


def test_import_is_light():
    # Importing fastclip must not import triton, DALI, flash-attn or xformers.
    code = ("import sys, fastclip, fastclip.ops, fastclip.nn; "
            "print([m for m in ('triton', 'nvidia.dali', 'flash_attn', 'xformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_report_as_a_dict_for_logs():
    import json

    from fastclip.info import report_dict
    d = report_dict()
    json.dumps(d)  # plain data
    assert d["fastclip"] == fastclip.__version__ and "torch" in d["packages"]
    cpu = d["devices"]["cpu"]["ops"]
    assert "float32" in cpu["clip_loss"]["chunked"]["usable"]
    assert set(cpu) >= {"clip_loss", "siglip_loss", "simclr_loss", "attention", "patch_mask"}


def test_info_lists_simclr_loss():
    from fastclip import info
    out = info.report()
    assert "simclr_loss:" in out
    section = out.split("simclr_loss:", 1)[1]
    assert "chunked    usable" in section and "reference  usable" in section
