"""Data-parallel runs: two CPU processes (torchrun, gloo) against one process.

The test launches this file under `python -m torch.distributed.run --nproc_per_node 2`; each rank runs the same
KgCoOp smoke run through the runner (the global batch of 7 is cut into shares of 4 and 3 images, so the
share weighting is exercised), then evaluates the saved prompt sharded and whole. It then checks what is exact
by construction (evaluation counts, batches, files written once) and what agrees to float tolerance (the
trained prompt and the losses, since every step's gradient is the one-process gradient up to rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptclip.commands.run import load_config
from promptclip.config import RunConfig
from promptclip.engine.distributed import GLOBAL_BATCH_KEY, DataParallel
from promptclip.protocols.spec import single_run_spec
from promptclip.recipes import resolve_recipe
from promptclip.runs import RunOptions, execute

REPO = Path(__file__).resolve().parents[1]
RECIPE = resolve_recipe("smoke/kgcoop")
# 2 shots x 10 classes = 20 training images: two batches of 7 per epoch (drop_last), shared 4 + 3.
OPTS = ["optim.epochs", "2", "optim.lr", "0.05", "data.batch_size", "7", "data.eval_batch_size", "8"]
TEST_IMAGES = 30  # 10 classes x 3: evaluation batches of 8, 8, 8, 6; rank 0 takes the 1st and 3rd


def smoke_config() -> RunConfig:
    return load_config(RECIPE, None, OPTS)


# ---------------------------------------------------------------------------------------------------------
# Without processes: the arithmetic of the shares
# ---------------------------------------------------------------------------------------------------------


def group(rank: int, world: int) -> DataParallel:
    return DataParallel(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


@pytest.mark.parametrize("count", [7, 8, 9])
def test_shares_cover_a_batch_once_in_order(count: int) -> None:
    for world in (2, 3):
        pieces = [list(range(count))[group(r, world).share(count)] for r in range(world)]
        assert [i for piece in pieces for i in piece] == list(range(count))
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_loss_weights_make_the_rank_mean_the_batch_mean() -> None:
    losses = torch.arange(7, dtype=torch.float64)  # per-image losses of one batch of 7
    whole = losses.mean()
    weighted = []
    for rank in range(2):
        share = losses[group(rank, 2).share(7)]
        batch = {"label": torch.zeros(len(share)), GLOBAL_BATCH_KEY: 7}
        weighted.append(share.mean() * group(rank, 2).loss_weight(batch))
    assert float(sum(weighted) / 2) == pytest.approx(float(whole), abs=1e-12)
    assert group(0, 2).loss_weight({"label": torch.zeros(3)}) == 1.0  # not a shared batch


def test_rank_batches_take_every_nth_batch() -> None:
    assert group(0, 2).rank_batches(list("abcd")) == ["a", "c"]
    assert group(1, 2).rank_batches(list("abcde")) == ["b", "d"]


# ---------------------------------------------------------------------------------------------------------
# Two processes against one
# ---------------------------------------------------------------------------------------------------------


def launch_two_ranks(runs: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    command += ["--nproc_per_node", "2", __file__, "--worker", str(runs), str(out)]
    finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    cfg = smoke_config()
    single = single_run_spec(cfg, "kgcoop", root / "one")
    assert execute(single, cfg, RunOptions(echo=False, progress=False)).status == "done"
    launch_two_ranks(root / "two", root / "worker")
    parallel = single_run_spec(cfg, "kgcoop", root / "two")
    return {"one": single.run_dir, "two": parallel.run_dir, "worker": root / "worker"}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def epoch_lines(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "epoch" in line]


def test_evaluation_counts_are_exactly_the_one_process_counts(runs: dict[str, Path]) -> None:
    for rank in (0, 1):
        report = read_json(runs["worker"] / f"rank{rank}.json")
        assert sum(report["whole"]["total"]) == TEST_IMAGES
        assert report["sharded"] == report["whole"]  # each rank's batches, summed over ranks
        assert report["filled"] == report["whole"] and report["served"] == report["whole"]
        # First pass: this rank's images encoded and stored; second pass: all of them read back.
        mine = 16 if rank == 0 else 14
        assert (report["misses"], report["hits"]) == (mine, mine)


def test_training_matches_one_process_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    one, two = read_json(runs["one"] / "results.json"), read_json(runs["two"] / "results.json")
    assert two["train"]["steps"] == one["train"]["steps"] == 4  # 2 epochs x 2 batches of 7
    a = load_file(str(runs["one"] / "prompt" / "prompt.safetensors"))
    b = load_file(str(runs["two"] / "prompt" / "prompt.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        moved = (a[key] - load_initial_context()).abs().max()
        assert moved > 1e-3  # training changed the prompt, so the comparison below means something
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    losses_one = [(m["epoch"], m["loss"], m["kg"]) for m in epoch_lines(runs["one"])]
    losses_two = [(m["epoch"], m["loss"], m["kg"]) for m in epoch_lines(runs["two"])]
    assert [e for e, _, _ in losses_two] == [1, 2]  # one line per epoch: only rank 0 writes
    for (_, loss_a, kg_a), (_, loss_b, kg_b) in zip(losses_one, losses_two, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and kg_b == pytest.approx(kg_a, rel=1e-5, abs=1e-6)
    assert two["evaluations"]["all"]["total"] == one["evaluations"]["all"]["total"]
    correct_one, correct_two = one["evaluations"]["all"]["correct"], two["evaluations"]["all"]["correct"]
    assert sum(abs(x - y) for x, y in zip(correct_one, correct_two, strict=True)) <= 1


def test_rank_zero_alone_writes_the_run_folder(runs: dict[str, Path]) -> None:
    log = (runs["two"] / "log.txt").read_text()
    assert log.count("== ") == 1 and log.count("epoch 2/2") == 1
    assert (runs["two"] / "checkpoints" / "last.pt").is_file()
    statuses = [read_json(runs["worker"] / f"rank{rank}.json")["status"] for rank in (0, 1)]
    assert statuses == ["done", "done"]


def load_initial_context() -> torch.Tensor:
    """The context KgCoOp starts from ("a photo of a"), to show that training moved it."""
    from promptclip.clip.weights import load_clip
    from promptclip.methods.prompting import context_init_from_text

    torch.manual_seed(0)
    return context_init_from_text(load_clip("tiny-vit", weights="random"), "a photo of a")


# ---------------------------------------------------------------------------------------------------------
# The worker, run by torchrun
# ---------------------------------------------------------------------------------------------------------


def worker(runs: Path, out: Path) -> None:
    from promptclip.engine.distributed import current_data_parallel, shutdown
    from promptclip.engine.evaluate import ImageFeatureCache, evaluate
    from promptclip.methods.base import PromptModel
    from promptclip.runs.inputs import DatasetCache, eval_loader, load_backbone

    cfg = smoke_config()
    spec = single_run_spec(cfg, "kgcoop", runs)
    outcome = execute(spec, cfg, RunOptions(echo=False, progress=False))
    group = current_data_parallel()
    assert group is not None and group.world_size == 2
    clip = load_backbone(cfg, group.device)
    splits = DatasetCache(cfg).get(cfg.data.dataset)
    learner = PromptModel.from_pretrained(clip, spec.run_dir / "prompt")
    loader = eval_loader(splits, "test", cfg, clip, group.device)
    cache = ImageFeatureCache()
    store = cache.store(clip, "test images", "fp32", group.device)
    counts = {
        "whole": evaluate(learner, loader).to_dict(),
        "sharded": evaluate(learner, loader, data_parallel=group).to_dict(),
        "filled": evaluate(learner, loader, image_features=store, data_parallel=group).to_dict(),
    }
    misses = cache.misses
    counts["served"] = evaluate(learner, loader, image_features=store, data_parallel=group).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    report = {"status": outcome.status, "misses": misses, "hits": cache.hits, **counts}
    (out / f"rank{group.rank}.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(Path(sys.argv[2]), Path(sys.argv[3]))
