"""`promptclip report`: tables built from results.json counts, averaging rules, marks, CSV and plots."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from promptclip.cli import main
from promptclip.commands.report import generate_report
from promptclip.reports.collect import ResultFileError, collect_runs, harmonic_mean, read_result, summarize
from promptclip.reports.index import ResultIndex
from promptclip.reports.tables import (
    AVERAGE_KEY,
    DAGGER,
    MISSING,
    Table,
    TableOptions,
    build_tables,
    render_csv,
    render_markdown,
)
from promptclip.runs.results import Evaluation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    protocol: str,
    dataset: str,
    method: str,
    seed: int,
    evaluations: dict[str, tuple[list[int], list[int]]],
    recipe: str = "vit_b16",
    shots: int = 16,
    transductive: bool = False,
    setting_folder: str | None = None,
) -> Path:
    folder = root / protocol / dataset / method / recipe / (setting_folder or f"shots{shots}") / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": 1,
        "protocol": protocol,
        "dataset": dataset,
        "method": method,
        "recipe": recipe,
        "shots": shots,
        "seed": seed,
        "transductive": transductive,
        "backbone": {"arch": "ViT-B-16", "weights_sha256": "0" * 64},
        "evaluations": {
            key: {
                "correct": correct,
                "total": total,
                "accuracy": 100.0 * sum(correct) / sum(total),
            }
            for key, (correct, total) in evaluations.items()
        },
    }
    path = folder / "results.json"
    path.write_text(json.dumps(payload))
    return path


def acc(correct: int, total: int = 1000) -> tuple[list[int], list[int]]:
    """A single-class evaluation with the given counts."""
    return [correct], [total]


def tables_of(root: Path, options: TableOptions | None = None) -> dict[str, Table]:
    return {table.name: table for table in build_tables(ResultIndex(collect_runs(root).runs), options)}


def markdown_row(markdown: str, *labels: str) -> list[str]:
    """The cells (labels excluded) of the markdown table row whose first cells are `labels`."""
    for line in markdown.splitlines():
        cells = [text.strip() for text in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[: len(labels)] == list(labels):
            return cells[len(labels) :]
    raise AssertionError(f"no row {labels} in:\n{markdown}")


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- counts and statistics ----------------------------------------------------------------------------------
def test_micro_and_macro_accuracy_come_from_counts() -> None:
    counts = Evaluation("dtd", "all", "test", correct=(90, 1), total=(100, 10))
    assert counts.accuracy == pytest.approx(100 * 91 / 110)
    assert counts.macro_accuracy == pytest.approx(100 * (0.9 + 0.1) / 2)


def test_population_std_and_ci95() -> None:
    stat = summarize([80.0, 82.0, 84.0])
    assert stat.mean == pytest.approx(82.0)
    assert stat.std == pytest.approx(math.sqrt(8 / 3))  # ddof 0; the sample std would be 2.0
    assert stat.ci95 == pytest.approx(1.96 * math.sqrt(8 / 3) / math.sqrt(3))
    assert harmonic_mean(90.0, 60.0) == pytest.approx(72.0)


# -- base-to-novel ----------------------------------------------------------------------------------------------
def test_base2new_cells_hold_seed_mean_std_and_per_dataset_hm(tmp_path: Path) -> None:
    for seed, (b, n) in enumerate([(800, 600), (820, 610), (840, 620)], start=1):
        write_run(tmp_path, "base2new", "dtd", "coop", seed, {"base": acc(b), "new": acc(n)})
    table = tables_of(tmp_path)["base2new_shots16"]
    base, new, hm = (table.cell("dtd", f"coop {part}") for part in ("Base", "New", "HM"))
    assert base.mean == pytest.approx(82.0)
    assert base.spread == pytest.approx(math.sqrt(8 / 3))
    assert new.mean == pytest.approx(61.0)
    assert hm.mean == pytest.approx(2 * 82.0 * 61.0 / (82.0 + 61.0))
    assert hm.spread is None
    assert markdown_row(render_markdown(table), "DTD") == ["82.00 ± 1.63", "61.00 ± 0.82", "69.96"]


def test_average_row_hm_is_hm_of_averages_not_mean_of_dataset_hms(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "dtd", "coop", 1, {"base": acc(900), "new": acc(100)})
    write_run(tmp_path, "base2new", "eurosat", "coop", 1, {"base": acc(100), "new": acc(900)})
    table = tables_of(tmp_path)["base2new_shots16"]
    assert table.cell("dtd", "coop HM").mean == pytest.approx(18.0)
    assert table.cell("eurosat", "coop HM").mean == pytest.approx(18.0)
    average = table.row(AVERAGE_KEY)
    assert [cell.mean for cell in average.cells] == pytest.approx([50.0, 50.0, 50.0])  # not 18.00
    assert render_markdown(table).splitlines()[4].startswith("| **Average**")
    assert markdown_row(render_markdown(table), "**Average**") == ["50.00", "50.00", "50.00"]


# Per-dataset Base / New of CoOp (ViT-B/16, base-to-novel) as published; its Average row is 82.69/63.22/71.66.
COOP_BASE2NEW = {
    "imagenet": (76.47, 67.88),
    "caltech101": (98.00, 89.81),
    "oxford_pets": (93.67, 95.29),
    "stanford_cars": (78.12, 60.40),
    "oxford_flowers": (97.60, 59.67),
    "food101": (88.33, 82.26),
    "fgvc_aircraft": (40.44, 22.30),
    "sun397": (80.60, 65.89),
    "dtd": (79.44, 41.18),
    "eurosat": (92.19, 54.74),
    "ucf101": (84.69, 56.05),
}


def test_reproduces_the_published_coop_average_row(tmp_path: Path) -> None:
    for dataset, (base, new) in COOP_BASE2NEW.items():
        counts = {"base": acc(round(base * 100), 10000), "new": acc(round(new * 100), 10000)}
        write_run(tmp_path, "base2new", dataset, "coop", 1, counts)
    table = tables_of(tmp_path)["base2new_shots16"]
    average = [f"{cell.mean:.2f}" for cell in table.row(AVERAGE_KEY).cells]
    assert average == ["82.69", "63.22", "71.66"]
    assert [row.label for row in table.rows][:3] == ["Average", "ImageNet", "Caltech101"]
    assert f"{table.cell('stanford_cars', 'coop HM').mean:.2f}" == "68.13"


def test_missing_seed_is_marked_and_the_mean_uses_the_seeds_present(tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        write_run(tmp_path, "base2new", "dtd", "coop", seed, {"base": acc(800), "new": acc(600)})
    for seed, b in ((1, 700), (2, 720)):
        write_run(tmp_path, "base2new", "eurosat", "coop", seed, {"base": acc(b), "new": acc(500)})
    table = tables_of(tmp_path)["base2new_shots16"]
    cell = table.cell("eurosat", "coop Base")
    assert cell.mean == pytest.approx(71.0)
    assert cell.notes == ("coop on EuroSAT: missing seed 3",)
    assert table.cell("dtd", "coop Base").notes == ()
    markdown = render_markdown(table)
    assert "71.00 ± 1.00[1]" in markdown
    assert "- [1] coop on EuroSAT: missing seed 3" in markdown


def test_missing_dataset_shows_a_dash_and_the_average_says_what_it_covers(tmp_path: Path) -> None:
    for dataset, b in (("dtd", 800), ("eurosat", 600)):
        write_run(tmp_path, "base2new", dataset, "coop", 1, {"base": acc(b), "new": acc(500)})
    write_run(tmp_path, "base2new", "dtd", "cocoop", 1, {"base": acc(700), "new": acc(650)})
    table = tables_of(tmp_path)["base2new_shots16"]
    assert table.cell("eurosat", "cocoop Base").mean is None
    assert table.cell(AVERAGE_KEY, "cocoop Base").mean == pytest.approx(70.0)
    assert table.cell(AVERAGE_KEY, "coop Base").mean == pytest.approx(70.0)
    markdown = render_markdown(table)
    assert markdown_row(markdown, "EuroSAT") == [MISSING, MISSING, MISSING, "60.00", "50.00", "54.55"]
    assert "cocoop Base: mean over 1 of 2 (no EuroSAT)" in markdown
    assert f"- {MISSING} no results for this method and dataset." in markdown


def test_transductive_runs_carry_a_dagger_and_a_footnote(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "dtd", "coop", 1, {"base": acc(800), "new": acc(600)})
    write_run(tmp_path, "base2new", "dtd", "promptkd", 1, {"base": acc(900), "new": acc(800)}, transductive=True)
    table = tables_of(tmp_path)["base2new_shots16"]
    markdown = render_markdown(table)
    assert markdown_row(markdown, "DTD") == [
        "80.00",
        "60.00",
        "68.57",
        f"90.00{DAGGER}",
        f"80.00{DAGGER}",
        f"84.71{DAGGER}",
    ]
    assert f"- {DAGGER} transductive" in markdown
    assert table.cell(AVERAGE_KEY, "promptkd HM").transductive
    assert not table.cell(AVERAGE_KEY, "coop HM").transductive
    rows = parse_csv(render_csv(table))
    assert "transductive: promptkd Base, promptkd New, promptkd HM" in rows[1]["notes"]


def test_csv_parses_back_to_the_table_numbers(tmp_path: Path) -> None:
    for seed, (b, n) in enumerate([(800, 600), (820, 610), (840, 620)], start=1):
        write_run(tmp_path, "base2new", "dtd", "coop", seed, {"base": acc(b), "new": acc(n)})
        write_run(tmp_path, "base2new", "eurosat", "coop", seed, {"base": acc(b - 100), "new": acc(n + 100)})
    table = tables_of(tmp_path)["base2new_shots16"]
    rows = {row["dataset"]: row for row in parse_csv(render_csv(table))}
    assert list(rows) == ["average", "dtd", "eurosat"]
    assert float(rows["dtd"]["coop Base"]) == 82.00
    assert float(rows["dtd"]["coop Base std"]) == 1.63
    assert float(rows["eurosat"]["coop New"]) == 71.00
    assert float(rows["average"]["coop Base"]) == 77.00
    assert float(rows["average"]["coop HM"]) == round(harmonic_mean(77.0, 66.0), 2)
    assert rows["average"]["coop Base std"] == ""
    for row in table.rows:
        for column, cell in zip(table.columns, row.cells, strict=True):
            assert float(rows[row.key][column]) == round(cell.mean, 2)


def test_ci95_replaces_the_std(tmp_path: Path) -> None:
    for seed, b in enumerate([800, 820, 840], start=1):
        write_run(tmp_path, "base2new", "dtd", "coop", seed, {"base": acc(b), "new": acc(600)})
    table = tables_of(tmp_path, TableOptions(spread="ci95"))["base2new_shots16"]
    assert table.cell("dtd", "coop Base").spread == pytest.approx(1.96 * math.sqrt(8 / 3) / math.sqrt(3))
    assert "coop Base ci95" in render_csv(table).splitlines()[0]
    assert "95% interval" in render_markdown(table)


def test_macro_metric_weights_classes_equally(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "dtd", "coop", 1, {"base": ([90, 1], [100, 10]), "new": acc(500)})
    micro = tables_of(tmp_path)["base2new_shots16"].cell("dtd", "coop Base").mean
    macro = tables_of(tmp_path, TableOptions(metric="macro_accuracy"))["base2new_shots16"].cell("dtd", "coop Base")
    assert micro == pytest.approx(100 * 91 / 110)
    assert macro.mean == pytest.approx(50.0)
    markdown = render_markdown(tables_of(tmp_path, TableOptions(metric="macro_accuracy"))["base2new_shots16"])
    assert "- Mean per-class accuracy (%)" in markdown


# -- few-shot, data-efficient, transfer -----------------------------------------------------------------------------
def test_few_shot_table_has_a_column_per_shot_count_and_merges_recipes(tmp_path: Path) -> None:
    for shots, recipe, base in ((1, "vit_b16_ep50", 600), (16, "vit_b16", 800)):
        for dataset, offset in (("dtd", 0), ("eurosat", 100)):
            for seed in (1, 2):
                correct = base + offset + 10 * seed
                write_run(tmp_path, "few_shot", dataset, "coop", seed, {"all": acc(correct)}, recipe, shots)
    tables = tables_of(tmp_path)
    table = tables["few_shot_coop"]
    assert table.columns == ["1 shot", "16 shots"]
    assert table.x_values == [1.0, 16.0]
    assert table.cell("dtd", "1 shot").mean == pytest.approx(61.5)
    assert table.cell("eurosat", "16 shots").mean == pytest.approx(91.5)
    assert table.cell(AVERAGE_KEY, "16 shots").mean == pytest.approx(86.5)
    assert "Recipes: coop: vit_b16, vit_b16_ep50." in render_markdown(table)
    summary = tables["few_shot_average"]
    assert [cell.mean for cell in summary.row("coop").cells] == pytest.approx([66.5, 86.5])


def test_two_recipes_for_the_same_setting_become_two_columns(tmp_path: Path) -> None:
    write_run(tmp_path, "few_shot", "dtd", "coop", 1, {"all": acc(600)}, "vit_b16", 16)
    write_run(tmp_path, "few_shot", "dtd", "coop", 1, {"all": acc(700)}, "vit_b16_ctxv1", 16)
    summary = tables_of(tmp_path)["few_shot_average"]
    assert [row.key for row in summary.rows] == ["coop/vit_b16", "coop/vit_b16_ctxv1"]
    assert [row.cells[0].mean for row in summary.rows] == pytest.approx([60.0, 70.0])


def test_data_efficient_reads_ratio_and_selector_from_the_folder(tmp_path: Path) -> None:
    for selector, ratio, correct in (("random", 0.1, 500), ("random", 0.5, 700), ("entropy", 0.1, 550)):
        for dataset in ("dtd", "eurosat"):
            write_run(
                tmp_path,
                "data_efficient",
                dataset,
                "coop",
                1,
                {"all": acc(correct)},
                setting_folder=f"ratio{ratio}-{selector}",
            )
    tables = tables_of(tmp_path)
    assert tables["data_efficient_coop"].columns == ["entropy 0.1", "random 0.1", "random 0.5"]
    summary = tables["data_efficient_average"]
    assert summary.columns == ["0.1", "0.5"]
    assert summary.cell("coop / random", "0.5").mean == pytest.approx(70.0)
    assert summary.cell("coop / entropy", "0.5").mean is None


def test_cross_dataset_shows_source_apart_and_averages_the_targets(tmp_path: Path) -> None:
    for seed in (1, 2):
        evaluations = {"source": acc(700), "eurosat": acc(400 + seed), "caltech101": acc(900), "dtd": acc(500)}
        write_run(tmp_path, "cross_dataset", "imagenet", "coop", seed, evaluations)
    table = tables_of(tmp_path)["cross_dataset_imagenet_shots16"]
    assert table.columns == ["ImageNet (source)", "Caltech101", "DTD", "EuroSAT", "Mean (targets)"]
    row = table.row("coop")
    assert row.cells[0].mean == pytest.approx(70.0)
    assert row.cells[-1].mean == pytest.approx((90.0 + 50.0 + 40.15) / 3)


def test_domain_generalisation_orders_the_four_targets(tmp_path: Path) -> None:
    evaluations = {
        "source": acc(7151, 10000),
        "imagenet_r": acc(7521, 10000),
        "imagenet_a": acc(4971, 10000),
        "imagenetv2": acc(6420, 10000),
        "imagenet_sketch": acc(4799, 10000),
    }
    write_run(tmp_path, "domain_generalization", "imagenet", "coop", 1, evaluations)
    table = tables_of(tmp_path)["domain_generalization_imagenet_shots16"]
    assert table.columns[1:] == ["ImageNet-V2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R", "Mean (targets)"]
    assert f"{table.row('coop').cells[-1].mean:.2f}" == "59.28"  # CoOp's published mean of the 4 targets


def test_an_unknown_protocol_gets_one_column_per_evaluation(tmp_path: Path) -> None:
    for dataset, correct in (("dtd", 600), ("eurosat", 800)):
        write_run(tmp_path, "open_set", dataset, "coop", 1, {"known": acc(correct), "unknown": acc(300)})
    table = tables_of(tmp_path)["open_set_shots16"]
    assert table.columns == ["coop known", "coop unknown"]
    assert [cell.mean for cell in table.row(AVERAGE_KEY).cells] == pytest.approx([70.0, 30.0])


# -- reading files ------------------------------------------------------------------------------------------------
def test_invalid_files_name_the_field(tmp_path: Path) -> None:
    path = write_run(tmp_path, "base2new", "dtd", "coop", 1, {"base": acc(800)})
    data = json.loads(path.read_text())
    del data["seed"]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match="missing field 'seed'"):
        read_result(path)
    data["seed"] = 1
    data["evaluations"]["base"]["correct"] = [1001]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match=r"evaluations\.base: a class has more correct"):
        read_result(path)


def test_a_stored_accuracy_that_disagrees_with_its_counts_is_noted(tmp_path: Path) -> None:
    path = write_run(tmp_path, "base2new", "dtd", "coop", 1, {"base": acc(800)})
    data = json.loads(path.read_text())
    data["evaluations"]["base"]["accuracy"] = 81.0
    path.write_text(json.dumps(data))
    run, notes = read_result(path)
    assert run.evaluations["base"].accuracy == pytest.approx(80.0)
    assert notes == ["evaluations.base.accuracy is 81.0 but its counts give 80.0000; the counts are used"]


def test_corrupt_and_partial_files_are_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "base2new", "dtd", "coop", 1, {"base": acc(800), "new": acc(600)})
    truncated = write_run(runs, "base2new", "dtd", "coop", 2, {"base": acc(820), "new": acc(610)})
    truncated.write_text(truncated.read_text()[:40])
    no_counts = write_run(runs, "base2new", "dtd", "coop", 3, {"base": acc(840), "new": acc(620)})
    no_counts.write_text(no_counts.read_text().replace('"total"', '"totals"'))
    assert main(["report", str(runs), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert f"skipped: {truncated}: is not valid JSON" in captured.err
    assert f"skipped: {no_counts}: evaluations.base.total should be a list of integers" in captured.err
    assert markdown_row(captured.out, "coop", "DTD") == ["80.00", "60.00", "68.57"]
    assert "base2new/dtd/coop/vit_b16/shots16/seed2/results.json: is not valid JSON" in captured.out
    # The fix is named: move the damaged file aside and run the same command again.
    assert "move it aside" in captured.err and "run the same command again" in captured.err


def test_two_runs_folders_with_the_same_key_show_both(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Schema-1 files (no identity) of the same method, recipe and seed in two runs folders: two series,
    # labelled by their runs folder; neither is dropped.
    write_run(tmp_path / "a", "base2new", "dtd", "coop", 1, {"base": acc(800), "new": acc(600)})
    write_run(tmp_path / "b", "base2new", "dtd", "coop", 1, {"base": acc(100), "new": acc(100)})
    index = ResultIndex(collect_runs([tmp_path / "a", tmp_path / "b"]).runs)
    assert index.problems == []
    table = build_tables(index)[0]
    assert table.cell("dtd", "coop (a) Base").mean == pytest.approx(80.0)
    assert table.cell("dtd", "coop (b) Base").mean == pytest.approx(10.0)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--no-plots", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert markdown_row(out, "coop (a)", "DTD") == ["80.00", "60.00", "68.57"]
    assert markdown_row(out, "coop (b)", "DTD") == ["10.00", "10.00", "10.00"]


def test_no_results_is_an_error_naming_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert f"no usable results.json under {tmp_path}" in capsys.readouterr().err


# -- command and files -----------------------------------------------------------------------------------------------
def _few_shot_and_base2new_runs(root: Path) -> None:
    for method, shift in (("coop", 0), ("cocoop", 50)):
        for dataset in ("dtd", "eurosat"):
            for seed in (1, 2):
                write_run(root, "base2new", dataset, method, seed, {"base": acc(800 + shift), "new": acc(600)})
                for shots in (1, 2, 4):
                    correct = 500 + 50 * shots + shift + seed
                    write_run(root, "few_shot", dataset, method, seed, {"all": acc(correct)}, shots=shots)


def test_report_command_writes_markdown_csv_and_valid_pngs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    _few_shot_and_base2new_runs(runs)
    assert main(["report", str(runs), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "### Base-to-novel generalisation (16 shots)" in stdout
    assert stdout == (out / "report.md").read_text() + "\n"
    expected_csv = {"base2new_shots16", "base2new_shots16_average", "few_shot", "few_shot_average", "runs"}
    assert {p.stem for p in out.glob("*.csv")} == expected_csv
    long_rows = parse_csv((out / "base2new_shots16.csv").read_text())
    assert [(row["method"], row["dataset"]) for row in long_rows] == [
        ("cocoop", "dtd"),
        ("cocoop", "eurosat"),
        ("coop", "dtd"),
        ("coop", "eurosat"),
    ]
    assert float(long_rows[2]["Base"]) == 80.0 and long_rows[2]["Base std"] == "0.00"
    runs_rows = parse_csv((out / "runs.csv").read_text())
    assert len(runs_rows) == 2 * 2 * 2 * (2 + 3)
    assert runs_rows[0]["path"].startswith("base2new/")
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["base2new_shots16.png", "few_shot_average.png", "few_shot_curves.png"]
    for name in plots:
        path = out / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert "![few_shot_curves](plots/few_shot_curves.png)" in (out / "report.md").read_text()


def test_format_option_limits_the_files(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _few_shot_and_base2new_runs(runs)
    assert main(["report", str(runs), "--format", "csv", "--no-plots"]) == 0
    out = runs / "report"
    assert not (out / "report.md").exists() and (out / "base2new_shots16.csv").exists()
    assert not (out / "plots").exists()
    assert main(["report", str(runs), "--format", "pdf"]) == 2


def test_without_matplotlib_the_tables_are_still_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    _few_shot_and_base2new_runs(runs)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = generate_report(runs, tmp_path / "out")
    assert report.plot_error is not None and "pip install promptclip[report]" in report.plot_error
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "base2new_shots16.csv").exists()
    assert not (tmp_path / "out" / "plots").exists()
