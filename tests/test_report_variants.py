"""`promptclip report` on schema-2 results: variants shown apart and labelled, the same run counted once,
the backbone named, the long form, the plot data (reference lines, error bars) and confusion matrices."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from promptclip.cli import main
from promptclip.commands.report import generate_report
from promptclip.reports.collect import collect_runs, read_result
from promptclip.reports.index import ResultIndex
from promptclip.reports.plots import (
    MAX_DRAWN_CLASSES,
    bar_panels,
    confusion_panels,
    curve_panels,
)
from promptclip.reports.tables import (
    MAX_HEADER,
    Table,
    TableOptions,
    base2new_long_table,
    build_long_tables,
    render_markdown,
    report_tables,
    settings_long_table,
)
from promptclip.runs.identity import SHORT
from promptclip.runs.results import Evaluation, RunResults, evaluation_from_counts

VIT_SHA = "1a2b3c4d" + "0" * 56
DROP = object()
"""An identity change that removes the key."""
Counts = tuple[list[int], list[int]]


def counts(correct: int, total: int = 100, classes: int = 1) -> Counts:
    """`classes` classes of total // classes images each, `correct` spread over them from the first."""
    per_class = total // classes
    right = [min(per_class, max(0, correct - i * per_class)) for i in range(classes)]
    return right, [per_class] * classes


def evaluation(name: str, values: Counts, dataset: str) -> Evaluation:
    """An evaluation whose wrong predictions all go to the next class (a known confusion)."""
    correct, total = values
    size = len(total)
    errors = [(c, (c + 1) % size, t - k) for c, (k, t) in enumerate(zip(correct, total, strict=True)) if t > k]
    classnames = [f"{name}{i}" for i in range(size)]
    return evaluation_from_counts(dataset, name, "test", classnames, correct, total, errors if size > 1 else None)


def write_result(
    root: Path,
    evaluations: Mapping[str, Counts],
    *,
    protocol: str = "base2new",
    dataset: str = "dtd",
    method: str = "coop",
    recipe: str = "vit_b16",
    seed: int = 1,
    shots: int = 16,
    arch: str = "ViT-B/16",
    sha: str | None = VIT_SHA,
    changes: Mapping[str, Any] | None = None,
    variant_folder: bool = False,
) -> Path:
    """A schema-2 results.json written by `RunResults.to_json`, with a hand-built identity (`changes` on top)
    in the runs layout; `variant_folder`: in `<recipe>-<fingerprint>/` as a second variant is."""
    identity: dict[str, Any] = {
        "method": method,
        "method_cfg.n_ctx": 4,
        "method_cfg.csc": False,
        "plugins": {},
        "optim.lr": 0.002,
        "optim.epochs": 10,
        "model.arch": arch,
        "model.weights": None if sha else "random",
        "backbone.arch": arch,
        "backbone.weights_sha256": sha,
        "data.dataset": dataset,
        "data.shots": shots,
        "seed": seed,
        "protocol": protocol,
        "targets": [{"key": key, "dataset": dataset} for key in evaluations],
    }
    identity.update(changes or {})
    identity = {key: value for key, value in identity.items() if value is not DROP}
    results = RunResults(
        protocol=protocol,
        dataset=dataset,
        method=method,
        recipe=recipe,
        seed=seed,
        shots=shots,
        evaluations={key: evaluation(key, value, dataset) for key, value in evaluations.items()},
        identity=identity,
        backbone={"arch": arch, "weights_sha256": sha, "weights": "file" if sha else "random"},
    )
    folder_name = f"{recipe}-{results.variant_id[:SHORT]}" if variant_folder else recipe
    folder = root / protocol / dataset / method / folder_name / f"shots{shots}" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(results.to_json()))
    return path


def base_new(base: int, new: int) -> dict[str, Counts]:
    return {"base": counts(base), "new": counts(new)}


def long_table(root: Path | list[Path], options: TableOptions | None = None) -> tuple[Table, ResultIndex]:
    index = ResultIndex(collect_runs(root).runs)
    return base2new_long_table(index, index.settings("base2new")[0], options or TableOptions()), index


def row_values(table: Any) -> dict[tuple[str, str], list[float | None]]:
    return {(row.series, row.dataset): [cell.mean for cell in row.cells] for row in table.rows}


# -- variants are never dropped ----------------------------------------------------------------------------------
# The reference variant (the one in the recipe's own folder) goes by the method's name; every other variant is
# labelled by the keys in which it differs from it.
@pytest.mark.parametrize(
    ("changes", "labels"),
    [
        ({"optim.lr": 0.5}, ("coop", "coop (optim.lr=0.5)")),
        ({"method_cfg.csc": True}, ("coop", "coop (method_cfg.csc=true)")),
    ],
    ids=["learning-rate", "method-field"],
)
def test_two_variants_of_one_recipe_are_both_shown_and_labelled(
    tmp_path: Path, changes: dict[str, Any], labels: tuple[str, str]
) -> None:
    for dataset in ("dtd", "eurosat"):
        write_result(tmp_path, base_new(80, 60), dataset=dataset)
    write_result(tmp_path, base_new(50, 40), changes=changes, variant_folder=True)  # dtd only
    table, index = long_table(tmp_path)
    assert index.problems == []
    values = row_values(table)
    assert values[(labels[0], "dtd")][:2] == pytest.approx([80.0, 60.0])
    assert values[(labels[0], "eurosat")][:2] == pytest.approx([80.0, 60.0])  # one series over both datasets
    assert values[(labels[1], "dtd")][:2] == pytest.approx([50.0, 40.0])
    assert (labels[1], "eurosat") not in values
    assert {row.series for row in table.rows} == set(labels)
    markdown = render_markdown(table)
    assert f"| {labels[1]} " in markdown


def test_a_plugin_field_variant_is_labelled_by_that_field(tmp_path: Path) -> None:
    dpc = {"plugins": DROP, "plugins.dpc.omega_b": 0.1, "plugins.dpc.top_k": 2, "stage1.optim.lr": 0.002}
    write_result(tmp_path, base_new(80, 60), method="coop+dpc", changes=dpc)
    other = {**dpc, "plugins.dpc.omega_b": 0.3}
    write_result(tmp_path, base_new(70, 65), method="coop+dpc", changes=other, variant_folder=True)
    values = row_values(long_table(tmp_path)[0])
    assert values[("coop+dpc", "dtd")][:2] == pytest.approx([80.0, 60.0])
    assert values[("coop+dpc (plugins.dpc.omega_b=0.3)", "dtd")][:2] == pytest.approx([70.0, 65.0])


def test_other_backbone_weights_are_a_variant_named_by_their_fingerprint(tmp_path: Path) -> None:
    write_result(tmp_path, base_new(80, 60))
    other = "9f8e7d6c" + "1" * 56
    write_result(tmp_path, base_new(85, 62), sha=other, changes={"model.weights": "/w/other.pt"}, variant_folder=True)
    table, _ = long_table(tmp_path)
    labels = {row.series for row in table.rows}
    # model.weights repeats the weights' difference: only the fingerprint names it.
    assert labels == {"coop", "coop (backbone.weights_sha256=9f8e7d6c)"}
    assert table.extra_headers == ["Dataset", "Backbone"]
    backbones = {row.series: row.extra[1] for row in table.rows}
    assert backbones["coop (backbone.weights_sha256=9f8e7d6c)"] == "ViT-B/16 (9f8e7d6c)"
    assert backbones["coop"] == "ViT-B/16 (1a2b3c4d)"


def test_the_same_recipe_on_two_backbones_is_labelled_by_the_arch_from_results(tmp_path: Path) -> None:
    write_result(tmp_path, base_new(80, 60))
    write_result(tmp_path, base_new(30, 25), arch="tiny-vit", sha=None, variant_folder=True)
    table, _ = long_table(tmp_path)
    assert {row.series for row in table.rows} == {"coop", "coop (backbone.arch=tiny-vit)"}
    markdown = render_markdown(table)
    # The recipe is named vit_b16, but the row of the tiny-vit runs says tiny-vit, with random weights.
    assert markdown_cells(markdown, "coop (backbone.arch=tiny-vit)")[:2] == ["DTD", "tiny-vit (random)"]
    assert markdown_cells(markdown, "coop")[:2] == ["DTD", "ViT-B/16 (1a2b3c4d)"]


def test_own_datasets_with_other_names_are_rows_and_one_name_for_two_datasets_is_split(tmp_path: Path) -> None:
    # Two own datasets under their own names: one row each, one series.
    write_result(tmp_path, base_new(80, 60), dataset="pets_mine")
    write_result(tmp_path, base_new(70, 50), dataset="pets_theirs")
    # Two datasets shown under one name whose identities differ: both kept, labelled by the dataset identity.
    write_result(tmp_path, base_new(90, 90), dataset="shelter", changes={"data.dataset": "shelter@2023"})
    later = {"data.dataset": "shelter@2024"}
    write_result(tmp_path, base_new(60, 60), dataset="shelter", changes=later, variant_folder=True)
    values = row_values(long_table(tmp_path)[0])
    assert values[("coop", "pets_mine")][:2] == pytest.approx([80.0, 60.0])
    assert values[("coop", "pets_theirs")][:2] == pytest.approx([70.0, 50.0])
    assert values[("coop (data.dataset=shelter@2023)", "shelter")][:2] == pytest.approx([90.0, 90.0])
    assert values[("coop (data.dataset=shelter@2024)", "shelter")][:2] == pytest.approx([60.0, 60.0])


def test_seeds_and_shot_counts_never_split_a_series(tmp_path: Path) -> None:
    for shots in (1, 4, 16):
        for seed in (1, 2, 3):
            changes = {"optim.epochs": 50 if shots < 4 else 10}  # set by the shot count: not a variant
            write_result(
                tmp_path, {"all": counts(50 + shots + seed)}, protocol="few_shot", shots=shots, seed=seed,
                changes=changes,
            )  # fmt: skip
    index = ResultIndex(collect_runs(tmp_path).runs)
    table = settings_long_table(index, "few_shot", "all", TableOptions())
    assert [row.series for row in table.rows] == ["coop"]
    assert table.columns == ["1 shot", "4 shots", "16 shots"]
    assert table.rows[0].cells[2].mean == pytest.approx(68.0)
    assert table.rows[0].cells[2].spread == pytest.approx(math.sqrt(2 / 3))


def test_the_same_run_found_twice_is_counted_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "runs", tmp_path / "copy"
    write_result(first, base_new(80, 60), seed=1)
    write_result(first, base_new(82, 62), seed=2)
    shutil.copytree(first, second)  # a copied runs folder: the same runs, same run_ids
    write_result(second, base_new(84, 64), seed=3)  # and one more seed of that variant
    index = ResultIndex(collect_runs([first, second]).runs)
    assert len(index.all_runs) == 3
    assert [p.message for p in index.problems if "counted once" in p.message] == [
        f"the same run (run_id {index.all_runs[0].run_id[:12]}) as {first}/base2new/dtd/coop/vit_b16/shots16/"
        "seed1/results.json; counted once",
        f"the same run (run_id {index.all_runs[1].run_id[:12]}) as {first}/base2new/dtd/coop/vit_b16/shots16/"
        "seed2/results.json; counted once",
    ]
    table = base2new_long_table(index, index.settings("base2new")[0], TableOptions())
    assert [row.series for row in table.rows] == ["coop"]
    assert table.rows[0].cells[0].mean == pytest.approx(82.0)
    assert main(["report", str(first), str(second), "--no-plots", "--out", str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    assert f"3 runs read from `{first}`, `{second}`" in captured.out
    assert markdown_cells(captured.out, "coop")[:3] == ["DTD", "82.00 ± 1.63", "62.00 ± 1.63"]
    assert captured.err.count("counted once") == 2


def test_a_folder_given_twice_is_read_once(tmp_path: Path) -> None:
    write_result(tmp_path, base_new(80, 60))
    collection = collect_runs([tmp_path, tmp_path / "base2new"])
    assert len(collection.runs) == 1
    assert "counted once" in collection.problems[0].message


def test_runs_moved_aside_by_overwrite_are_left_out(tmp_path: Path) -> None:
    path = write_result(tmp_path, base_new(10, 10), changes={"optim.lr": 9.0})
    replaced = path.parent.with_name("seed1.replaced-20250101-120000")
    path.parent.rename(replaced)
    write_result(tmp_path, base_new(80, 60))
    collection = collect_runs(tmp_path)
    assert len(collection.runs) == 1
    assert collection.problems[0].path == replaced / "results.json"
    assert "moved aside by --overwrite" in collection.problems[0].message


# -- a report of ten methods -------------------------------------------------------------------------------------
METHODS = ("zeroshot", "coop", "cocoop", "kgcoop", "maple", "ivlp", "promptsrc", "promptkd", "coop+dapt", "coop+dpc")
DATASETS = ("dtd", "eurosat", "caltech101")


def markdown_cells(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} "))
    return [text.strip() for text in line.strip().strip("|").split("|")][1:]


def table_headers(markdown: str) -> list[list[str]]:
    lines = markdown.splitlines()
    return [
        [text.strip() for text in line.strip().strip("|").split("|")]
        for line, rule in itertools.pairwise(lines)
        if line.startswith("|") and re.fullmatch(r"\|( -+:? \|)+", rule)
    ]


def test_ten_methods_on_three_datasets_read_as_one_row_per_method_and_dataset(tmp_path: Path) -> None:
    for m, method in enumerate(METHODS):
        for d, dataset in enumerate(DATASETS):
            for seed in (1, 2):
                write_result(tmp_path, base_new(60 + m + d, 50 + m), method=method, dataset=dataset, seed=seed)
    # A long variant label of one method: it goes to a row, never to a column header.
    long_lr = {"optim.lr": 0.00123456789, "method_cfg.n_ctx": 16, "optim.epochs": 200}
    write_result(tmp_path, base_new(70, 55), method="coop", changes=long_lr, variant_folder=True)
    report = generate_report(tmp_path, tmp_path / "out", formats=("md",), plots=False)
    summary, detail = report.tables
    pairs = [(row.series, row.dataset) for row in detail.rows]
    assert len(pairs) == len(set(pairs)) == 10 * 3 + 1
    assert {row.method for row in detail.rows} == set(METHODS)
    assert detail.columns == ["Base", "New", "HM"] and detail.extra_headers == ["Dataset"]
    assert len(summary.rows) == 11 and {row.dataset for row in summary.rows} == {"average"}
    for markdown in (report.markdown, *(render_markdown(t) for t in report_tables(ResultIndex(
        collect_runs(tmp_path).runs), layout="wide"))):  # fmt: skip
        headers = [cell for header in table_headers(markdown) for cell in header]
        assert headers and max(len(h) for h in headers) <= MAX_HEADER
    assert "Backbone: ViT-B/16 (1a2b3c4d)." in report.markdown
    variant = "coop (method_cfg.n_ctx=16, optim.epochs=200, optim.lr=0.00123456789)"
    assert (variant, "dtd") in pairs and ("coop", "dtd") in pairs


# -- plot data ----------------------------------------------------------------------------------------------------
def test_bar_plot_data_holds_chance_zero_shot_and_seed_error_bars(tmp_path: Path) -> None:
    for dataset in ("dtd", "eurosat"):
        write_result(
            tmp_path, {"base": counts(60, 100, 4), "new": counts(50, 100, 5)}, method="zeroshot", dataset=dataset
        )
        for seed, base in ((1, 70), (2, 74)):
            write_result(
                tmp_path, {"base": counts(base, 100, 4), "new": counts(40, 100, 5)}, dataset=dataset, seed=seed
            )
    table, _ = long_table(tmp_path)
    base, new, hm = bar_panels(table)
    assert [group.label for group in base.groups] == ["Average", "DTD", "EuroSAT"]
    dtd = base.groups[1]
    assert [bar.series for bar in dtd.bars] == ["coop"]  # zero-shot is a line, not a bar
    assert dtd.bars[0].value == pytest.approx(72.0) and dtd.bars[0].error == pytest.approx(2.0)
    references = {(r.kind, r.label): r.value for r in dtd.references}
    assert references == {("chance", "chance"): pytest.approx(25.0), ("zero-shot", "zeroshot"): pytest.approx(60.0)}
    assert {(r.kind, r.label): r.value for r in new.groups[1].references} == {
        ("chance", "chance"): pytest.approx(20.0),
        ("zero-shot", "zeroshot"): pytest.approx(50.0),
    }
    chance_hm = next(r.value for r in hm.groups[0].references if r.kind == "chance")
    assert chance_hm == pytest.approx(2 * 25 * 20 / 45)
    assert base.groups[0].bars[0].error == 0.0  # an average has no seed spread


def test_curve_plot_data_holds_chance_zero_shot_and_seed_error_bars(tmp_path: Path) -> None:
    for shots in (1, 2, 4):
        write_result(tmp_path, {"all": counts(45, 100, 10)}, protocol="few_shot", method="zeroshot", shots=shots)
        for seed in (1, 2, 3):
            correct = 40 + 5 * shots + 2 * seed
            write_result(tmp_path, {"all": counts(correct, 100, 10)}, protocol="few_shot", shots=shots, seed=seed)
    index = ResultIndex(collect_runs(tmp_path).runs)
    (panel,) = curve_panels(settings_long_table(index, "few_shot", "all", TableOptions()))
    (line,) = panel.lines
    assert line.label == "coop" and line.x == (1.0, 2.0, 4.0)
    assert line.y == pytest.approx((49.0, 54.0, 64.0))
    assert line.error == pytest.approx((math.sqrt(8 / 3),) * 3)
    assert {(r.kind, r.value) for r in panel.references} == {("chance", 10.0), ("zero-shot", 45.0)}


def test_plots_are_written_with_the_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_result(runs, {"base": counts(70, 100, 4), "new": counts(40, 100, 5)}, seed=seed)
        write_result(runs, {"all": counts(40, 60, 3)}, protocol="few_shot", shots=2, seed=seed)
    report = generate_report(runs, tmp_path / "out")
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in report.files if p.suffix == ".png")
    assert names == [
        "plots/base2new_shots16.png",
        "plots/confusion/base2new/dtd/coop/vit_b16/shots16/seed1.png",
        "plots/confusion/base2new/dtd/coop/vit_b16/shots16/seed2.png",
        "plots/confusion/few_shot/dtd/coop/vit_b16/shots2/seed1.png",
        "plots/confusion/few_shot/dtd/coop/vit_b16/shots2/seed2.png",
        "plots/few_shot_curves.png",
    ]
    for name in names:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 runs with confusion counts" in report.markdown
    assert main(["report", str(runs), "--out", str(tmp_path / "bare"), "--no-confusion"]) == 0
    assert not (tmp_path / "bare" / "plots" / "confusion").exists()


# -- confusion matrices ------------------------------------------------------------------------------------------
def test_the_confusion_matrix_equals_the_counts(tmp_path: Path) -> None:
    path = write_result(tmp_path, {"base": ([8, 5, 0], [10, 10, 10]), "new": counts(40, 100, 4)})
    run, _ = read_result(path, tmp_path)
    panels, notes = confusion_panels(run)
    assert notes == [] and [p.evaluation for p in panels] == ["base", "new"]
    base = panels[0]
    # Wrong predictions go to the next class (see `evaluation`): 2 of class 0 as 1, 5 of 1 as 2, 10 of 2 as 0.
    assert base.matrix == ((8, 2, 0), (0, 5, 5), (10, 0, 0))
    assert base.classnames == ("base0", "base1", "base2") and base.labelled
    assert [sum(row) for row in base.matrix] == [10, 10, 10]
    assert [base.matrix[i][i] for i in range(3)] == [8, 5, 0]
    assert base.title == "base: 43.3% (3 classes)"


def test_large_confusion_matrices_lose_their_labels_then_are_not_drawn(tmp_path: Path) -> None:
    path = write_result(tmp_path, {"base": counts(300, 600, 60), "new": counts(500, 1000, MAX_DRAWN_CLASSES + 50)})
    run, _ = read_result(path, tmp_path)
    panels, notes = confusion_panels(run)
    assert [(p.evaluation, p.labelled, len(p.matrix)) for p in panels] == [("base", False, 60)]
    assert notes == [
        f"new: 250 classes, more than the {MAX_DRAWN_CLASSES} a confusion plot draws; its counts are in results.json"
    ]


def test_long_tables_of_every_protocol_keep_headers_short(tmp_path: Path) -> None:
    targets = {"source": counts(70), **{f"target_dataset_with_a_very_long_name_{i}": counts(40 + i) for i in range(3)}}
    write_result(tmp_path, targets, protocol="cross_dataset", dataset="imagenet")
    write_result(tmp_path, {"known": counts(70), "unknown_classes_rejected_at_threshold_0.5": counts(30)},
                 protocol="open_set")  # fmt: skip
    tables = build_long_tables(ResultIndex(collect_runs(tmp_path).runs))
    cross = next(t for t in tables if t.kind == "cross_dataset")
    assert [row.extra[0] for row in cross.rows] == [
        "Mean (targets)",
        "ImageNet (source)",
        "target_dataset_with_a_very_long_name_0",
        "target_dataset_with_a_very_long_name_1",
        "target_dataset_with_a_very_long_name_2",
    ]
    assert cross.rows[0].cells[0].mean == pytest.approx(41.0)
    for table in tables:
        headers = table_headers(render_markdown(table))
        assert max(len(h) for header in headers for h in header) <= MAX_HEADER


def test_a_file_that_names_no_weights_never_claims_random_weights(tmp_path: Path) -> None:
    path = write_result(tmp_path, base_new(80, 60))
    data = json.loads(path.read_text())
    data["schema"], data["backbone"] = 1, {"arch": "ViT-B/16"}
    for key in ("identity", "run_id", "variant_id"):
        del data[key]
    path.write_text(json.dumps(data))
    table, _ = long_table(tmp_path)
    assert "Backbone: ViT-B/16 (weights not recorded)." in table.notes
    del data["backbone"]
    path.write_text(json.dumps(data))
    assert "Backbone: backbone not recorded." in long_table(tmp_path)[0].notes
