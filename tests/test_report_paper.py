"""`promptclip report --paper`: the published numbers shipped as package data, the paper rows and the Δ columns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_reports import acc, markdown_row, parse_csv, write_run

from promptclip.commands.report import ReportError, generate_report
from promptclip.reports.collect import harmonic_mean
from promptclip.reports.paper import (
    PAPER_DATASETS,
    PaperNumbersError,
    load_paper_numbers,
    parse_paper_numbers,
)
from promptclip.reports.table_model import Table

NUMBERS = load_paper_numbers()
COOP = NUMBERS.get("coop", "base2new")
assert COOP is not None


def counts_for(base: float, new: float) -> dict[str, tuple[list[int], list[int]]]:
    """Evaluations whose accuracies are exactly `base` and `new` (two decimals: counts out of 10000)."""
    return {"base": acc(round(base * 100), 10000), "new": acc(round(new * 100), 10000)}


def report(root: Path, **options: object) -> tuple[dict[str, Table], str]:
    result = generate_report(root, root / "report", plots=False, paper=True, **options)  # type: ignore[arg-type]
    return {table.name: table for table in result.tables}, result.markdown


def paper_row(table: Table, method: str, dataset: str):  # type: ignore[no-untyped-def]
    return next(row for row in table.rows if row.label == f"{method} (paper)" and row.dataset == dataset)


def our_row(table: Table, series: str, dataset: str):  # type: ignore[no-untyped-def]
    return next(row for row in table.rows if row.series == series and row.dataset == dataset)


def test_delta_is_ours_minus_paper_in_every_column(tmp_path: Path) -> None:
    base, new, hm = COOP.datasets["dtd"]
    write_run(tmp_path, "base2new", "dtd", "coop", 1, counts_for(base + 1.25, new - 2.5))
    tables, markdown = report(tmp_path)
    table = tables["base2new_shots16"]
    assert table.columns == ["Base", "New", "HM", "Δ Base", "Δ New", "Δ HM"]
    ours = our_row(table, "coop", "dtd")
    deltas = [cell.mean for cell in ours.cells[3:]]
    ours_hm = harmonic_mean(base + 1.25, new - 2.5)
    # Counts out of 10000 give the accuracies exactly; the Δ is then plain float subtraction.
    assert deltas == pytest.approx([1.25, -2.5, ours_hm - hm], abs=1e-9)
    paper = paper_row(table, "coop", "dtd")
    assert [cell.mean for cell in paper.cells[:3]] == [base, new, hm]
    assert all(cell.mean is None for cell in paper.cells[3:])  # the Δ lives on our row
    assert markdown_row(markdown, "coop", "DTD") == [
        "80.69",
        "38.68",
        f"{ours_hm:.2f}",
        "1.25",
        "-2.50",
        f"{ours_hm - hm:.2f}",
    ]


def test_a_dataset_or_method_without_published_numbers_is_blank_not_zero(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "synthetic_shapes", "coop", 1, counts_for(50, 40))
    write_run(tmp_path, "base2new", "dtd", "coop+nothing", 1, counts_for(50, 40))
    tables, markdown = report(tmp_path)
    table = tables["base2new_shots16"]
    for method, dataset, label in (("coop", "synthetic_shapes", "synthetic_shapes"), ("coop+nothing", "dtd", "DTD")):
        paper = paper_row(table, method, dataset)
        assert all(cell.mean is None for cell in paper.cells)
        assert markdown_row(markdown, f"{method} (paper)", label) == ["—"] * 6
        assert all(cell.mean is None for cell in our_row(table, method, dataset).cells[3:])
    assert "No published numbers shipped for: coop+nothing." in table.notes
    csv_rows = parse_csv((tmp_path / "report" / "base2new_shots16.csv").read_text())
    blank = next(r for r in csv_rows if r["method"] == "coop (paper)" and r["dataset"] == "synthetic_shapes")
    assert blank["Base"] == blank["Δ Base"] == ""


def test_an_average_over_some_datasets_compares_with_the_papers_numbers_on_those(tmp_path: Path) -> None:
    for dataset in ("dtd", "eurosat"):
        base, new, _ = COOP.datasets[dataset]
        write_run(tmp_path, "base2new", dataset, "coop", 1, counts_for(base, new))
    table = report(tmp_path)[0]["base2new_shots16_average"]
    paper = paper_row(table, "coop", "average")
    bases, news = ([COOP.datasets[d][i] for d in ("dtd", "eurosat")] for i in (0, 1))
    expected = [sum(bases) / 2, sum(news) / 2]
    expected.append(harmonic_mean(*expected))  # the report's rule: HM of the averaged Base and New
    assert [cell.mean for cell in paper.cells[:3]] == pytest.approx(expected, abs=1e-12)
    # Our runs hold the paper's own numbers, so every Δ is zero (up to float sums).
    assert [cell.mean for cell in our_row(table, "coop", "average").cells[3:]] == pytest.approx([0, 0, 0], abs=1e-9)


def test_an_average_over_other_datasets_shows_the_printed_average_without_a_delta(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "dtd", "coop", 1, counts_for(70, 60))
    write_run(tmp_path, "base2new", "synthetic_shapes", "coop", 1, counts_for(70, 60))
    table = report(tmp_path)[0]["base2new_shots16_average"]
    paper = paper_row(table, "coop", "average")
    assert [cell.mean for cell in paper.cells[:3]] == list(COOP.average or ())
    assert all("not over the ones averaged here" in cell.notes[0] for cell in paper.cells[:3])
    assert all(cell.mean is None for cell in our_row(table, "coop", "average").cells[3:])


def test_the_eleven_datasets_compare_with_the_printed_average(tmp_path: Path) -> None:
    for dataset in PAPER_DATASETS:
        base, new, _ = COOP.datasets[dataset]
        write_run(tmp_path, "base2new", dataset, "coop", 1, counts_for(base, new))
    table = report(tmp_path)[0]["base2new_shots16_average"]
    assert [cell.mean for cell in paper_row(table, "coop", "average").cells[:3]] == [82.69, 63.22, 71.66]
    # Our average of the printed per-dataset numbers against the printed average: the per-dataset numbers and
    # the average are each rounded to 0.01, so the means differ by at most 0.005 + 0.005.
    deltas = [cell.mean for cell in our_row(table, "coop", "average").cells[3:]]
    assert all(delta is not None and abs(delta) <= 0.01 for delta in deltas)


def test_other_shot_counts_and_protocols_without_numbers_get_blanks(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "dtd", "coop", 1, counts_for(70, 60), shots=4)
    table = report(tmp_path)[0]["base2new_shots4"]
    assert all(cell.mean is None for cell in paper_row(table, "coop", "dtd").cells)
    assert any("16-shot numbers" in note for note in table.notes)


def test_few_shot_paper_rows_use_the_shot_columns(tmp_path: Path) -> None:
    for shots in (1, 16):
        for dataset in PAPER_DATASETS:
            write_run(tmp_path, "few_shot", dataset, "lp", 1, {"all": acc(5000, 10000)}, shots=shots)
    table = report(tmp_path)[0]["few_shot_average"]
    lp = NUMBERS.get("lp", "few_shot")
    assert lp is not None and lp.average is not None
    assert [cell.mean for cell in paper_row(table, "lp", "average").cells[:2]] == [lp.average[0], lp.average[4]]
    assert [cell.mean for cell in our_row(table, "lp", "average").cells[2:]] == pytest.approx(
        [50 - lp.average[0], 50 - lp.average[4]], abs=1e-9
    )


def test_transductive_published_numbers_carry_the_dagger(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "dtd", "promptkd", 1, counts_for(80, 70), transductive=True)
    table = report(tmp_path)[0]["base2new_shots16"]
    assert all(cell.transductive for cell in paper_row(table, "promptkd", "dtd").cells[:3])


def test_the_wide_layout_is_refused(tmp_path: Path) -> None:
    write_run(tmp_path, "base2new", "dtd", "coop", 1, counts_for(70, 60))
    with pytest.raises(ReportError, match="--paper"):
        generate_report(tmp_path, plots=False, paper=True, layout="wide")


# -- the shipped data ---------------------------------------------------------------------------------------------
def test_every_shipped_entry_names_its_source_and_reproduces_its_own_arithmetic() -> None:
    assert {"zeroshot", "coop", "cocoop", "kgcoop", "maple", "promptsrc", "promptkd", "coop+dpc", "lp"} <= {
        method for method, _ in NUMBERS.results
    }
    for (method, protocol), entry in NUMBERS.results.items():
        assert entry.source and entry.provenance, (method, protocol)
        if protocol != "base2new":
            continue
        for dataset, (base, new, hm) in entry.datasets.items():
            # The printed HM comes from the unrounded Base and New, each within 0.005 of its printed value, and is
            # itself rounded: |ΔHM| <= 0.005·(∂HM/∂B + ∂HM/∂N) + 0.005, with ∂HM/∂B = 2N²/(B+N)² and likewise.
            slope = 2 * (base**2 + new**2) / (base + new) ** 2
            assert abs(harmonic_mean(base, new) - hm) <= 0.005 * slope + 0.005 + 1e-9, (method, dataset)
        if entry.average is not None and set(entry.datasets) == set(PAPER_DATASETS):
            for column in (0, 1):
                # A mean of values rounded to 0.01 is within 0.005 of the unrounded mean, printed to 0.01 again.
                mean = math.fsum(v[column] for v in entry.datasets.values()) / len(PAPER_DATASETS)
                assert abs(mean - entry.average[column]) <= 0.01 + 1e-9, (method, column)


def test_a_damaged_file_names_the_field() -> None:
    data = {
        "format": "promptclip-paper-numbers/1",
        "method": "coop",
        "protocols": {
            "base2new": {
                "source": "s",
                "provenance": "p",
                "columns": ["base", "new", "hm"],
                "datasets": {"dtd": [1, 2]},
            }
        },
    }
    with pytest.raises(PaperNumbersError, match=r"x.json: protocols.base2new.datasets.dtd: expected 3 accuracies"):
        parse_paper_numbers(data, "x.json")
    with pytest.raises(PaperNumbersError, match="not a paper-numbers file"):
        parse_paper_numbers({"method": "coop"}, "x.json")
