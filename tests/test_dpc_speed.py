"""DPC's speed paths give the numbers of the naive paths they replace (benchmarks/dpc_speed.py): ranking with the
forward's own image features instead of a second frozen pass, the negatives' pictures rendered in worker
processes instead of the main process; and a DPC step reads nothing computed from the batch or the model on
the host except its one ranking copy (on a GPU every such read waits for the device). On a tiny random CLIP."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpc_cases import dpc_builder, picture_splits
from dpc_speed import dpc_frozen_ranking_pass, dpc_pictures_in_main_process

from promptclip.clip.model import CLIP
from promptclip.plugins.dpc import DPC, DPCOutput
from promptclip.plugins.hard_negatives import PictureLibrary, PictureWorkers

NAMES = ["cat", "golden retriever", "red fox", "sports car", "tree frog", "apple pie", "hot air balloon"]
TEMPLATE = "a photo of a {}."


def build(clip: CLIP, method: str = "coop", method_cfg: dict[str, Any] | None = None, **dpc: Any) -> DPC:
    learner = dpc_builder(method, method_cfg or {"n_ctx": 4}, **dpc)(clip, NAMES, TEMPLATE)
    assert isinstance(learner, DPC)
    return learner.train()


def make_batch(clip: CLIP, labels: list[int], seed: int = 0) -> dict[str, Any]:
    size = clip.image_size
    images = torch.randn(len(labels), 3, size, size, generator=torch.Generator().manual_seed(seed))
    return {"image": images, "label": torch.tensor(labels), "index": torch.arange(len(labels))}


def step(learner: DPC, batch: dict[str, Any]) -> tuple[DPCOutput, torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's output, loss and gradients (not applied)."""
    learner.zero_grad(set_to_none=True)
    output = learner(batch)
    assert isinstance(output, DPCOutput)
    loss = learner.loss(batch, output)["dpc"]
    loss.backward()
    return output, loss.detach(), {n: p.grad.clone() for n, p in learner.trainable_parameters().items()}


# -- ranking with the forward's image features ------------------------------------------------------------------


def test_only_a_learner_with_a_frozen_image_side_ranks_with_its_forward_features(tiny_clip) -> None:
    assert build(tiny_clip, "coop").rank_with_forward_features
    assert build(tiny_clip, "kgcoop", {}).rank_with_forward_features
    assert not build(tiny_clip, "maple", {"depth": 2}).rank_with_forward_features
    assert not build(tiny_clip, "promptkd", {"depth_vision": 2, "teacher_arch": ""}).rank_with_forward_features


def test_ranking_with_the_forward_features_equals_a_frozen_ranking_pass(tiny_clip) -> None:
    ours, naive = build(tiny_clip, omega_b=0.5), build(tiny_clip, omega_b=0.5)
    batch = make_batch(tiny_clip, [0, 1, 4])
    output, loss, grads = step(ours, batch)
    # The stage-1 image features are the forward's: the frozen tower does not read the prompt.
    assert torch.equal(ours.ranking_scores(output.image_features), ours.stage1_scores(batch["image"]))
    with dpc_frozen_ranking_pass(naive):
        naive_output, naive_loss, naive_grads = step(naive, batch)
    assert naive.rank_with_forward_features  # restored
    assert torch.equal(output.pair_labels, naive_output.pair_labels)  # the same negatives
    # The naive path encodes the anchors together with the negatives (one larger image batch): equal up to
    # the rounding of a differently blocked matrix product, a few ulps of each feature.
    torch.testing.assert_close(output.pair_image_features, naive_output.pair_image_features, rtol=0, atol=2e-6)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grad, naive_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


# -- pictures rendered in worker processes ------------------------------------------------------------------------


@pytest.fixture
def workers_of() -> Iterator[Any]:
    """workers_of(library, n): picture workers, closed after the test."""
    started: list[PictureWorkers] = []

    def start(library: PictureLibrary, count: int) -> PictureWorkers:
        started.append(PictureWorkers(library, count, capacity=8))
        return started[-1]

    yield start
    for workers in started:
        workers.close()


def test_pictures_rendered_by_worker_processes_equal_the_main_process_ones(workers_of) -> None:
    library = PictureLibrary.from_splits(picture_splits(NAMES, per_class=3), image_size=24)
    requests = library.requests([6, 0, 3, 3, 5], torch.Generator().manual_seed(4))
    here = library.render_all(requests)
    there = library.render_all(requests, workers_of(library, 2))
    assert torch.equal(here.pixels, there.pixels) and here.paths == there.paths
    assert torch.equal(here.labels, torch.tensor([6, 0, 3, 3, 5]))
    # The images are bitwise TrainTransform's of the picture each request's seed picks.
    images = here.images()
    for request, path, image in zip(requests, here.paths, images, strict=True):
        generator = torch.Generator().manual_seed(request.seed)
        items = library.by_class[request.label]
        datum = items[int(torch.randint(len(items), (1,), generator=generator))]
        assert datum.path == path
        assert torch.equal(image, library.transform(library.splits.load_image(datum), generator))


def test_a_dpc_step_with_picture_workers_equals_one_without(tiny_clip) -> None:
    ours, naive = build(tiny_clip, "maple", {"depth": 2}), build(tiny_clip, "maple", {"depth": 2})
    ours.context.num_workers = naive.context.num_workers = 2
    batch = make_batch(tiny_clip, [2, 5, 6])
    try:
        output, loss, grads = step(ours, batch)
        assert ours.picture_workers() is not None
        assert copy.deepcopy(ours)._picture_workers is None  # a copy starts its own processes when it draws
        with dpc_pictures_in_main_process(naive):
            assert naive.picture_workers() is None
            naive_output, naive_loss, naive_grads = step(naive, batch)
    finally:
        workers = ours.picture_workers()
        if workers is not None:
            workers.close()
    assert torch.equal(output.pair_image_features, naive_output.pair_image_features)
    assert torch.equal(loss, naive_loss)
    assert all(torch.equal(grads[name], naive_grads[name]) for name in grads)


# -- no host read of device data in a step ------------------------------------------------------------------------

_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), `if t`
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.nonzero.default,  # data-dependent shapes: boolean indexing, masked_select
    torch.ops.aten.masked_select.default,
}


class HostReads(TorchDispatchMode):
    """Counts host reads of data computed from `sources` (the batch and the model): scalar reads and other
    ops that wait for the device, `.tolist()`/`.numpy()`, and explicit copies to the CPU (the sanctioned way,
    counted apart). Taint follows every op's outputs."""

    def __init__(self, sources: list[torch.Tensor]) -> None:
        super().__init__()
        self.tainted: dict[int, torch.Tensor] = {id(t): t for t in sources}
        self.syncs: list[str] = []
        self.copies = 0

    def is_tainted(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self.tainted

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tainted = any(self.is_tainted(leaf) for leaf in tree_leaves((args, kwargs)))
        if tainted and func in _SYNCING_OPS:
            self.syncs.append(str(func))
        out = func(*args, **kwargs)
        if tainted:
            if func is torch.ops.aten._to_copy.default and str(kwargs.get("device")) == "cpu":
                self.copies += 1  # a host copy: what is read from it afterwards is host data
            else:
                self.tainted.update({id(t): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)})
        return out


@pytest.mark.parametrize("method,method_cfg", [("coop", {"n_ctx": 4}), ("maple", {"depth": 2})])
def test_a_dpc_step_reads_the_device_once(tiny_clip, monkeypatch, method: str, method_cfg: dict[str, Any]) -> None:
    learner = build(tiny_clip, method, method_cfg)
    batch = make_batch(tiny_clip, [0, 3, 3, 5])
    step(learner, batch)  # built once per run: the picture library, cached class features
    sources = [batch["image"], batch["label"], *learner.parameters(), *learner.buffers()]
    reads = HostReads(sources)
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, _name: str = name) -> Any:
            if reads.is_tainted(tensor):
                reads.syncs.append(f"Tensor.{_name}")
            return _original(tensor, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with reads:
        step(learner, make_batch(tiny_clip, [1, 2, 2, 6], seed=1))
    assert reads.syncs == []
    assert reads.copies == 1  # the ranking, read once to pick the negatives' pictures
