"""fastclip.scaling.commands: ``fastclip fit`` from a results table to formulas, JSON and a plot."""

import json

import pytest

from fastclip.cli import main as cli_main

from .conftest import PUBLISHED


def test_fit_the_published_imagenet_table(tmp_path, capsys):
    out = tmp_path / "fit" / "imagenet"
    args = "--metric acc1 --dataset imagenet1k --bootstrap 200 --predict 1e14 --out".split()
    assert cli_main(["fit", PUBLISHED, *args, str(out)]) == 0
    text = capsys.readouterr().out
    assert "LAION (OpenCLIP): E = " in text and "OpenAI (CLIP-WIT): E = " in text and "(extrapolated)" in text
    report = json.loads((tmp_path / "fit" / "imagenet.json").read_text())
    assert set(report["groups"]) == {"LAION (OpenCLIP)", "OpenAI (CLIP-WIT)"}
    laion = report["groups"]["LAION (OpenCLIP)"]
    assert laion["method"] == "frontier" and laion["runs"] == 29 and len(laion["points"]) <= 5
    assert laion["ci"]["b"][0] < laion["b"] < laion["ci"]["b"][1]
    pred = laion["predictions"][0]
    assert pred["extrapolated"] and pred["interval"][0] < pred["error"] < pred["interval"][1]
    assert (tmp_path / "fit" / "imagenet.png").stat().st_size > 10_000


def test_fit_a_sweep_table_grouped_by_a_column(tmp_path, capsys):
    table = tmp_path / "sweep.csv"
    rows = ["model,strategy,gflops,zero_shot/top1"]
    for model, a in (("S", 0.9), ("M", 0.7)):
        for g in (1e3, 1e4, 1e5, 1e6):
            rows.append(f"{model},clip,{g},{1 - a * g**-0.1:.6f}")
    table.write_text("\n".join(rows) + "\n")
    args = "--metric zero_shot/top1 --compute gflops --group-by model --method lstsq --bootstrap 0".split()
    assert cli_main(["fit", str(table), *args]) == 0
    text = capsys.readouterr().out
    assert "model=M: E = 0.7 * C^-0.100" in text and "model=S: E = 0.9 * C^-0.100" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "top9"], "no column 'top9'"),
        (["--metric", "acc1", "--dataset", "imagenet22k"], "no row has downstream_dataset 'imagenet22k'"),
        (["--metric", "acc1", "--group-by", "colour"], "--group-by 'colour' is not a column"),
    ],
)
def test_bad_requests_fail_before_any_fit(args, message, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", PUBLISHED, *args])
    assert message in capsys.readouterr().err
