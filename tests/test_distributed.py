"""Data-parallel runs: two CPU processes (torchrun, gloo) against one process.

The test launches this file under `python -m torch.distributed.run --nproc_per_node 2`; each rank runs the same
KgCoOp smoke run through the runner (the global batch of 7 is cut into shares of 4 and 3 images, so the
share weighting is exercised), then evaluates the saved prompt sharded and whole. It then checks what is exact
by construction (evaluation counts, batches, files written once) and what agrees up to float32 rounding (the
trained prompt and the losses, since every step's gradient is the one-process gradient summed in another
order), within a bound derived from the sums involved (`rounding_bound`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptclip.clip.model import CLIP
from promptclip.commands.run import load_config
from promptclip.config import RunConfig
from promptclip.engine.distributed import GLOBAL_BATCH_KEY, DataParallel
from promptclip.methods.prompting import context_init_from_text
from promptclip.protocols.spec import single_run_spec
from promptclip.recipes import resolve_recipe
from promptclip.runs import RunOptions, execute
from promptclip.runs.inputs import load_backbone

REPO = Path(__file__).resolve().parents[1]
RECIPE = resolve_recipe("smoke/kgcoop")
# 2 shots x 10 classes = 20 training images: two batches of 7 per epoch (drop_last), shared 4 + 3.
OPTS = ["optim.epochs", "2", "optim.lr", "0.05", "data.batch_size", "7", "data.eval_batch_size", "8"]
CLASSES = 10
STEPS = 4  # 2 epochs x 2 batches of 7
TEST_IMAGES = 30  # 10 classes x 3: evaluation batches of 8, 8, 8, 6; rank 0 takes the 1st and 3rd
EPS = torch.finfo(torch.float32).eps


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


LAUNCH_TIMEOUT_S = 1200
# The module fixture launching the two ranks runs inside the first test that uses it: room for the launch.
pytestmark = pytest.mark.timeout(LAUNCH_TIMEOUT_S + 300)


def launch_two_ranks(runs: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    command += ["--nproc_per_node", "2", __file__, "--worker", str(runs), str(out)]
    # Two processes that import torch, train and evaluate: seconds on an idle machine, minutes on a loaded one.
    finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
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
    assert two["train"]["steps"] == one["train"]["steps"] == STEPS
    cfg = smoke_config()
    clip = load_backbone(cfg, torch.device("cpu"))
    bound = rounding_bound(clip, cfg.data.batch_size, CLASSES)
    a = load_file(str(runs["one"] / "prompt" / "prompt.safetensors"))
    b = load_file(str(runs["two"] / "prompt" / "prompt.safetensors"))
    assert a.keys() == b.keys()
    start = context_init_from_text(clip, cfg.method_cfg.ctx_init)  # the context KgCoOp starts from
    for key in a:
        moved = (a[key] - start).abs().max()
        assert moved > 1e-3  # training changed the prompt, so the comparison below means something
        # Terms: the updates (they go one way: two steps at the warm-up lr, then two with momentum) and the
        # prompt they are added to, once per step.
        tolerance = bound * float(moved) + STEPS * EPS * float(a[key].abs().max())
        torch.testing.assert_close(b[key], a[key], rtol=0.0, atol=tolerance)
    # Terms of a logged loss (a mean over images and steps): cross-entropy's logsumexp and true-class logit,
    # each at most s + log(classes) in size with logits s x cosine, and KgCoOp's W and W x mean cosine.
    scale = float(clip.logit_scale.exp())
    loss_tolerance = bound * (2 * (scale + math.log(CLASSES)) + 2 * cfg.method_cfg.weight)
    losses_one = [(m["epoch"], m["loss"], m["kg"]) for m in epoch_lines(runs["one"])]
    losses_two = [(m["epoch"], m["loss"], m["kg"]) for m in epoch_lines(runs["two"])]
    assert [e for e, _, _ in losses_two] == [1, 2]  # one line per epoch: only rank 0 writes
    for (_, loss_a, kg_a), (_, loss_b, kg_b) in zip(losses_one, losses_two, strict=True):
        assert abs(loss_b - loss_a) <= loss_tolerance and abs(kg_b - kg_a) <= loss_tolerance
    assert two["evaluations"]["all"]["total"] == one["evaluations"]["all"]["total"]
    # The two prompts differ by rounding: an image whose two best logits are that close may change class.
    correct_one, correct_two = one["evaluations"]["all"]["correct"], two["evaluations"]["all"]["correct"]
    assert sum(abs(x - y) for x, y in zip(correct_one, correct_two, strict=True)) <= 1


def test_rank_zero_alone_writes_the_run_folder(runs: dict[str, Path]) -> None:
    log = (runs["two"] / "log.txt").read_text()
    assert log.count("== ") == 1 and log.count("epoch 2/2") == 1
    assert (runs["two"] / "checkpoints" / "last.pt").is_file()
    statuses = [read_json(runs["worker"] / f"rank{rank}.json")["status"] for rank in (0, 1)]
    assert statuses == ["done", "done"]


def rounding_bound(clip: CLIP, batch: int, classes: int) -> float:
    """How far apart float32 rounding alone can put the one-process and the two-process runs, relative to the
    magnitudes each value was summed from.

    The two runs compute the same numbers in another order: one process sums the gradient of a batch of 7
    over its images in float32; two processes each sum their share (4 and 3 images) in float32 and the
    all-reduce adds the two in float64; the image tower sees batches of other sizes. Nothing else differs.
    A float32 sum of n terms is off by at most gamma_n * sum|terms|, gamma_n = n u / (1 - n u) with the unit
    roundoff u = eps / 2 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1), and to
    first order the errors of chained sums add. So each run's value of a quantity of a step is off by at most
    n u sum|terms| when n counts the float32 additions along the longest chain of the step, and the two runs
    differ by at most twice that, n eps sum|terms|; a further factor 2 covers what the first-order view
    leaves out (a rounded update changes the gradients of the next steps). Returns 2 n eps.

    n: the image tower's forward, the text tower's forward and backward (the prompt's gradient comes back
    through it), the logits (embed_dim), the softmax over the classes and the mean over the batch. A
    transformer block adds at most 10 width + tokens along any path: two layer norms (2 width), the q/k/v
    projections (width), the attention scores (width / heads), the softmax-weighted sum over the tokens, the
    output projection (width) and the MLP (width + 4 width); each tower then a final norm and projection.

    For the smoke run n = 4807: the prompt, moved by up to 0.53, may differ by 6e-4 (measured: 1e-6 to 2e-6;
    a gradient that leaves out the share weights puts it 0.1 off), a logged loss by 0.056 (measured: 3e-7;
    logging rank 0's share instead of the mean over ranks puts the losses 0.13 to 0.28 off).
    """

    def tower(width: int, layers: int, tokens: int) -> int:
        return layers * (10 * width + tokens) + 2 * width

    vision, text = clip.config.vision, clip.config.text
    assert vision.patch_size is not None, "the count below is that of a ViT image tower"
    patches = (vision.image_size // vision.patch_size) ** 2
    image = 3 * vision.patch_size**2 + tower(vision.width, vision.layers, patches + 1)  # patch embedding first
    additions = image + 2 * tower(text.width, text.layers, text.context_length) + clip.config.embed_dim
    return 2 * (additions + classes + batch) * EPS


# ---------------------------------------------------------------------------------------------------------
# The worker, run by torchrun
# ---------------------------------------------------------------------------------------------------------


def worker(runs: Path, out: Path) -> None:
    from promptclip.engine.distributed import current_data_parallel, shutdown
    from promptclip.engine.evaluate import ImageFeatureCache, evaluate
    from promptclip.methods.base import PromptModel
    from promptclip.runs.inputs import DatasetCache, eval_loader

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
