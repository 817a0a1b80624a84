"""Hostile and bad inputs of the run configuration and the run folders (see `tests/hostile.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from hostile import MARKER, Case

from promptclip.recipes import resolve_recipe

SMOKE = str(resolve_recipe("smoke/coop"))


def dry_run(*opts: str) -> object:
    def setup(tmp: Path) -> list[str]:
        argv = ["run", "few_shot", "--recipe", SMOKE, "--shots", "2", "--seeds", "1", "--runs-dir", str(tmp / "runs")]
        return [*argv, "--dry-run", "--opts", *opts]

    return setup


def train(*extra: str, folder: str = "run") -> object:
    def setup(tmp: Path) -> list[str]:
        return ["train", "--recipe", SMOKE, "--output", str(tmp / folder), "--quiet", *extra]

    return setup


BAD_VALUES = [  # key, value, what the message says the value must be
    ("optim.epochs", "0", "at least 1"),
    ("optim.epochs", "-1", "at least 1"),
    ("optim.lr", "-0.1", "greater than 0"),
    ("optim.lr", "0", "greater than 0"),
    ("optim.lr", ".nan", "greater than 0"),
    ("optim.momentum", "1.5", "in [0, 1)"),
    ("optim.weight_decay", "-1", "0 or more"),
    ("optim.warmup_epochs", "-2", "0 or more"),
    ("optim.grad_accum", "0", "at least 1"),
    ("optim.max_grad_norm", "0", "greater than 0"),
    ("data.batch_size", "0", "at least 1"),
    ("data.eval_batch_size", "0", "at least 1"),
    ("data.num_workers", "-2", "0 or more"),
    ("seed", "-1", "0 or more"),
]

CASES: list[Case] = [
    *(
        Case(f"config-{key}={value}", "traceback", dry_run(key, value), 2, (key, must))
        for key, value, must in BAD_VALUES
    ),
    Case("config-wrong-type", "traceback", dry_run("optim.epochs", "ten"), 2, ("optim.epochs", "'ten'")),
    Case(
        "config-unknown-key", "traceback", dry_run("optim.learning_rate", "0.1"), 2, ("optim.learning_rate", "allowed")
    ),
    Case("config-unknown-method", "traceback", dry_run("method", "coopp"), 2, ("coopp", "known")),
    Case("config-bad-literal", "traceback", dry_run("model.precision", "fp8"), 2, ("model.precision", "'fp16'")),
    Case(
        "config-exponent-without-dot-is-a-number",
        "unclear",
        dry_run("optim.lr", "1e-3"),
        0,
        ("1 runs, 0 done, 1 to run",),
    ),
    Case(
        "config-method-refuses-its-value",
        "traceback",
        train("--opts", "method_cfg.n_ctx", "2"),
        2,
        ("n_ctx=2", "method_cfg"),
        may_write=("run",),
    ),
    Case(
        "config-bad-value-under-python-m",
        "traceback",
        train("--opts", "optim.epochs", "0"),
        2,
        ("optim.epochs", "at least 1"),
        subprocess=True,
    ),
    Case(
        "diverging-run-stops",
        "diverge",
        train("--opts", "optim.lr", "1e6", "optim.warmup_epochs", "0", "optim.epochs", "2"),
        2,
        ("diverged", "optim.lr"),
        may_write=("run",),
        check=lambda tmp, out: _no_results(tmp / "run"),
    ),
]


def _no_results(folder: Path) -> None:
    assert not (folder / "results.json").exists(), "a diverged run must not write results"


# -- recipe files -----------------------------------------------------------------------------------------------
def recipe_with(text: str) -> object:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "recipe.yaml"
        path.write_text(text)
        return ["run", "few_shot", "--recipe", str(path), "--dry-run", "--runs-dir", str(tmp / "runs")]

    return setup


YAML_TAG = f"method: !!python/object/apply:os.system ['touch {MARKER}']\n"
CASES += [
    Case("recipe-python-tag", "code", recipe_with(YAML_TAG), 2, ("recipe.yaml", "not valid YAML")),
    Case("recipe-not-a-mapping", "traceback", recipe_with("- coop\n- maple\n"), 2, ("recipe.yaml", "mapping")),
    Case(
        "recipe-missing", "traceback", lambda tmp: ["train", "--recipe", "coop/nope"], 2, ("coop/nope", "list recipes")
    ),
]


# -- run folders ----------------------------------------------------------------------------------------------------
def folder_with_user_files(tmp: Path) -> list[str]:
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my notes\n")
    (run / "metrics.jsonl").write_text('{"mine": 1}\n')
    (run / "draft.tex").write_text("\\section{x}\n")
    return train()(tmp)  # type: ignore[operator]


def folder_with_run_of_other_config(tmp: Path) -> list[str]:
    from promptclip.cli import main

    assert main(train()(tmp)) == 0  # type: ignore[operator]
    return train("--opts", "optim.lr", "0.5")(tmp)  # type: ignore[operator]


def folder_with_symlinked_log(tmp: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "outside.txt").write_text("keep\n")
    (tmp / "run" / "log.txt").symlink_to(tmp / "outside.txt")
    return train()(tmp)  # type: ignore[operator]


def results_damaged(tmp: Path) -> list[str]:
    from promptclip.cli import main

    assert main(train()(tmp)) == 0  # type: ignore[operator]
    (tmp / "run" / "results.json").write_text('{"schema": 2, "evalu')
    return ["report", str(tmp / "run"), "--no-plots", "--out", str(tmp / "report")]


CASES += [
    Case("overwrite-user-files", "overwrite", folder_with_user_files, 2, ("{tmp}/run", "draft.tex", "--overwrite")),
    Case("overwrite-other-run", "overwrite", folder_with_run_of_other_config, 2, ("another configuration", "--output")),
    Case("overwrite-symlinked-log", "overwrite", folder_with_symlinked_log, 2, ("{tmp}/run", "--overwrite")),
    Case(
        "report-damaged-results",
        "unclear",
        results_damaged,
        2,
        ("results.json", "damaged", "--resume"),
        may_write=("report",),
    ),
]


def damaged_results_then(*extra: str) -> object:
    def setup(tmp: Path) -> list[str]:
        from promptclip.cli import main

        assert main(train()(tmp)) == 0  # type: ignore[operator]
        (tmp / "run" / "results.json").write_text('{"schema": 2, "evalu')  # cut by a crash or a full disk
        return train(*extra)(tmp)  # type: ignore[operator]

    return setup


def _redone_and_kept(tmp: Path, output: str) -> None:
    assert json.loads((tmp / "run" / "results.json").read_text())["evaluations"]
    (kept,) = (tmp / "run").glob("results.json.damaged-*")
    assert kept.read_text() == '{"schema": 2, "evalu'


CASES += [
    Case("damaged-results-refused-without-resume", "unclear", damaged_results_then(), 2, ("damaged", "--resume")),
    Case(
        "damaged-results-redone-with-resume",
        "unclear",
        damaged_results_then("--resume"),
        0,
        may_write=("run",),
        check=_redone_and_kept,
    ),
]


def _nothing_trained(tmp: Path, output: str) -> None:
    assert not list((tmp / "runs").rglob("last.pt")), "the run trained before finding it cannot be evaluated"


CASES += [
    Case(
        "class-specific-context-in-base2new-stops-before-training",
        "unclear",
        lambda tmp: [
            *("run", "base2new", "--recipe", SMOKE, "--seeds", "1", "--runs-dir", str(tmp / "runs")),
            *("--opts", "method_cfg.csc", "true"),
        ],
        2,
        ("cannot be evaluated on 'new'", "csc=false", "nothing was trained"),
        check=_nothing_trained,
    ),
]


def resume_changed_options(tmp: Path) -> list[str]:
    """An interrupted run resumed with another learning rate: another identity, so its folder is refused."""
    run = tmp / "run"
    from promptclip.cli import main

    assert main(train("--opts", "optim.epochs", "2")(tmp)) == 0  # type: ignore[operator]
    (run / "results.json").unlink()  # as if killed during the evaluation
    data = json.loads((run / "identity.json").read_text())
    assert data["identity"]["optim.epochs"] == 2
    return train("--resume", "--opts", "optim.epochs", "2", "optim.lr", "0.5")(tmp)  # type: ignore[operator]


CASES += [
    Case("resume-with-changed-options", "traceback", resume_changed_options, 2, ("another configuration", "{tmp}/run")),
    Case(
        "eval-missing-prompt-folder",
        "traceback",
        lambda tmp: ["eval", "--prompt", str(tmp / "nowhere"), "--dataset", "synthetic_shapes", "--arch", "tiny-vit"],
        2,
        ("nowhere",),
    ),
    Case(
        "nonsense-architecture-json",
        "traceback",
        lambda tmp: (
            (tmp / "arch.json").write_text(json.dumps({"name": "x", "vision": "big"})),
            ["run", "few_shot", "--recipe", SMOKE, "--dry-run", "--opts", "model.arch", str(tmp / "arch.json")],
        )[1],
        2,
        ("arch.json",),
    ),
]
