"""fastclip.scaling.results: reading results tables, selecting points, the study's grouping."""

import pytest

from fastclip.scaling import load_results, select_points, study_groups

from .conftest import PUBLISHED


def write(tmp_path, text, name="r.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_points_error_is_one_minus_metric_and_empty_metrics_are_skipped(tmp_path):
    rows = load_results(write(tmp_path, "arch,gflops,acc1,recall\nA,10,0.25,\nB,100,0.5,0.4\nC,1000,,0.6\n"))
    pts = select_points(rows, "acc1", compute="gflops", label=("arch",))
    assert (
        pts.compute.tolist() == [10.0, 100.0]
        and pts.error.tolist() == [0.75, 0.5]
        and pts.labels == ["A", "B"]
    )
    assert select_points(rows, "recall", compute="gflops", where={"arch": ["B", "C"]}).compute.tolist() == [
        100,
        1000,
    ]


@pytest.mark.parametrize(
    "text, kwargs, match",
    [
        (
            "arch,gflops\nA,10\n",
            {"metric": "acc1", "compute": "gflops"},
            r"no column 'acc1'; its columns are \['arch', 'gflops'\]",
        ),
        (
            "arch,gflops,acc1\nA,-10,0.5\n",
            {"metric": "acc1", "compute": "gflops"},
            r"row 2: compute column 'gflops' must be finite and > 0, got '-10'",
        ),
        ("arch,gflops,acc1\nA,nan,0.5\n", {"metric": "acc1", "compute": "gflops"}, "row 2: compute column"),
        (
            "arch,gflops,acc1\nA,10,1.5\n",
            {"metric": "acc1", "compute": "gflops"},
            r"row 2: metric 'acc1' must be in \[0, 1\)",
        ),
        (
            "arch,gflops,acc1\nA,10,high\n",
            {"metric": "acc1", "compute": "gflops"},
            "row 2: column 'acc1' must be a number, got 'high'",
        ),
        (
            "arch,gflops,acc1\nA,10,\n",
            {"metric": "acc1", "compute": "gflops"},
            "no row has a value for metric 'acc1'",
        ),
    ],
)
def test_bad_tables_are_refused_naming_row_and_column(tmp_path, text, kwargs, match):
    rows = load_results(write(tmp_path, text))
    with pytest.raises(ValueError, match=match):
        select_points(rows, **kwargs)


def test_missing_empty_or_headerless_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="no header row"):
        load_results(write(tmp_path, ""))
    with pytest.raises(ValueError, match="a header but no rows"):
        load_results(write(tmp_path, "a,b\n"))


def test_study_groups_of_the_published_table():
    rows = load_results(PUBLISHED)
    laion, openai = study_groups(rows, "acc1", "imagenet1k")
    assert (laion.name, laion.method, len(laion.compute)) == ("LAION (OpenCLIP)", "frontier", 29)
    assert (openai.name, openai.method, len(openai.compute)) == ("OpenAI (CLIP-WIT)", "lstsq", 3)
    with pytest.raises(ValueError, match="no row has downstream_dataset 'imagenet22k'"):
        study_groups(rows, "acc1", "imagenet22k")


def test_the_shipped_table_is_the_published_one():
    import gzip
    import hashlib
    import os

    with gzip.open(PUBLISHED, "rb") as f:
        content = f.read()
    # the sha256 of the study's zeroshot_results.csv as published (and as in shared/data)
    assert hashlib.sha256(content).hexdigest() == "a04786cfcde5d47436c8ddbca0f0bdbb39cc584c0d0776b4f99145ae430a6568"
    assert len(load_results(PUBLISHED)) == 1312
    shared = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "zeroshot_results.csv")
    if os.path.isfile(shared):  # the project's own copy, where the checkout has it
        with open(shared, "rb") as g:
            assert content == g.read()


def test_no_value_for_the_metric_is_its_own_error(tmp_path):
    from fastclip.scaling import NoValuesError
    rows = load_results(write(tmp_path, "arch,gflops,acc1\nA,10,\n"))
    with pytest.raises(NoValuesError, match="no row has a value for metric 'acc1' where"):
        select_points(rows, "acc1", compute="gflops", where={"arch": "A"})
