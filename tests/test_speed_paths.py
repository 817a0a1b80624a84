"""Every speed-up gives the numbers of the slow path it replaces (the naive paths of benchmarks/speed_paths.py):
end-of-text truncation, class features cached at evaluation, image features kept across evaluations, class
chunks with activation checkpointing, batched CoCoOp, DAPT's views (stop-gradient targets without a graph, the
others in the whole image's pass), DPC's cached ranking features, PromptKD's kept teacher image features and
decoded few-shot images kept in memory. On a tiny random CLIP."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpc_cases import NoiseReader, dpc_builder
from speed_paths import (
    cocoop_loss_one_image_at_a_time,
    cocoop_one_image_at_a_time,
    dapt_one_graph_pass,
    dapt_targets_with_graph,
    dapt_three_passes,
    dpc_rescoring,
    full_context,
    promptkd_teacher_every_epoch,
    reencode_text_per_batch,
)

from promptclip.clip.model import CLIP
from promptclip.clip.weights import arch_config
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.data.loader import PIXELS_KEY, build_loader
from promptclip.engine.evaluate import ImageFeatureCache, evaluate
from promptclip.methods.base import PromptModel, get_prompt_model
from promptclip.plugins.base import wrap_with_plugins

NAMES = ["cat", "golden retriever", "red fox", "sports car", "tree frog", "apple pie", "hot air balloon"]
IMAGE_SIZE = arch_config("tiny-vit").vision.image_size


TEXT_LEARNERS: dict[str, dict[str, Any]] = {
    "zeroshot": {},
    "coop": {"n_ctx": 4},
    "coop-middle": {"n_ctx": 4, "class_token_position": "middle"},
    "kgcoop": {},
    "maple": {"depth": 2},
    "ivlp": {"depth_text": 2, "depth_vision": 2},
    "deep_lang": {"depth": 2},
    "promptsrc": {"depth_text": 2, "depth_vision": 2},
}


@pytest.fixture
def build(tiny_clip: CLIP) -> Callable[..., PromptModel]:
    """build(name, names, seed, **cfg): the learner `name` (a key of TEXT_LEARNERS or a method) on tiny_clip."""

    def make(name: str, names: list[str] = NAMES, seed: int = 0, **cfg: Any) -> PromptModel:
        method = name.split("-")[0]
        torch.manual_seed(seed)
        return get_prompt_model(tiny_clip, {"method": method, **TEXT_LEARNERS.get(name, {}), **cfg}, names)

    return make


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def gradients(learner: PromptModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = learner.trainable_parameters()
    values = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), values, strict=True)}


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Equal up to float rounding: `atol` relative to the largest gradient entry of each tensor."""
    assert a.keys() == b.keys()
    assert any(g.abs().max() > 0 for g in a.values())
    for name in a:
        scale = max(1.0, float(b[name].abs().max()))
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol * scale, msg=name)


# -- end-of-text truncation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEXT_LEARNERS))
def test_cut_text_sequences_give_the_full_context_features(build, name: str) -> None:
    learner = build(name)
    with torch.no_grad():
        cut = learner.compute_text_features()
        with full_context(learner.clip):
            full = learner.compute_text_features()
    assert learner.clip.truncate_text  # restored
    torch.testing.assert_close(cut, full, rtol=0, atol=2e-6)


def test_cocoop_cut_prompts_give_the_full_context_logits(build) -> None:
    learner = build("cocoop")
    batch = {"image": images(3)}
    with torch.no_grad():
        cut = learner(batch).logits
        with full_context(learner.clip):
            full = learner(batch).logits
    torch.testing.assert_close(cut, full, rtol=0, atol=2e-5)


# -- class features cached at evaluation --------------------------------------------------------------------


def test_cached_class_features_equal_encoding_them_for_every_batch(build) -> None:
    learner = build("coop").eval()
    batches = [{"image": images(4, seed=s)} for s in range(3)]
    with torch.no_grad():
        cached = [learner(b).logits for b in batches]
        again = [reencode_text_per_batch(learner, b) for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(cached, again, strict=True))


# -- image features kept across evaluations ------------------------------------------------------------------


def noise_splits(per_class: int = 3) -> DatasetSplits:
    test = [Datum(f"test/{c}_{i}", c, n) for c, n in enumerate(NAMES) for i in range(per_class)]
    return DatasetSplits("noise", None, list(NAMES), "a photo of a {}.", [], [], test, reader=NoiseReader(size=20))


def test_stored_image_features_give_the_same_counts_without_reading_images(build, tiny_clip) -> None:
    splits = noise_splits()
    # No crop cache: the count of image reads is what tells stored features from read images.
    loader = build_loader(splits, "test", batch_size=4, train=False, image_size=tiny_clip.image_size, crop_cache=None)
    cache = ImageFeatureCache()
    store = cache.store(tiny_clip, "noise", "fp32", "cpu")
    reads_with_store = 0
    for name in ("zeroshot", "coop", "kgcoop", "deep_lang"):
        learner = build(name)
        assert learner.cacheable_image_features
        plain = evaluate(learner, loader)
        reads = splits.reader.reads
        first = evaluate(learner, loader, image_features=store)
        second = evaluate(learner, loader, image_features=store)
        reads_with_store += splits.reader.reads - reads
        assert plain == first == second
        assert sum(plain.total) == len(splits.test) and len(store) == len(splits.test)
    # Only the very first evaluation with the store read the images; the seven others classified stored features.
    assert reads_with_store == len(splits.test)
    assert cache.misses == len(splits.test) and cache.hits == 7 * len(splits.test)


def test_learners_with_trainable_image_sides_are_never_served_from_the_store(build, tiny_clip) -> None:
    splits = noise_splits(per_class=1)
    loader = build_loader(splits, "test", batch_size=4, train=False, image_size=tiny_clip.image_size)
    store = ImageFeatureCache().store(tiny_clip, "noise", "fp32", "cpu")
    learners = [build("ivlp"), build("cocoop"), wrap_with_plugins(build("coop"), {"dapt": {}})]
    for learner in learners:
        assert not learner.cacheable_image_features
        assert evaluate(learner, loader, image_features=store) == evaluate(learner, loader)
    assert len(store) == 0


def test_stores_are_kept_apart_by_backbone_data_and_precision(tiny_clip, tiny_clips) -> None:
    cache = ImageFeatureCache()
    store = cache.store(tiny_clip, "noise", "fp32", "cpu")
    assert cache.store(tiny_clip, "noise", "fp32", "cpu") is store
    others = [
        cache.store(tiny_clips("tiny-vit", 1), "noise", "fp32", "cpu"),  # other weights, same architecture
        cache.store(tiny_clip, "other data", "fp32", "cpu"),
        cache.store(tiny_clip, "noise", "bf16", "cpu"),
    ]
    assert all(other is not store for other in others) and len({id(o) for o in others}) == 3


def test_the_cache_drops_the_stores_used_longest_ago(tiny_clip) -> None:
    cache = ImageFeatureCache(max_images=5)
    old = cache.store(tiny_clip, "old", "fp32", "cpu")
    old.put([f"a{i}" for i in range(4)], torch.zeros(4, 8))
    new = cache.store(tiny_clip, "new", "fp32", "cpu")
    new.put([f"b{i}" for i in range(4)], torch.zeros(4, 8))
    assert cache.num_images == 4 and len(new) == 4
    assert cache.store(tiny_clip, "old", "fp32", "cpu") is not old


# -- class chunks with activation checkpointing ---------------------------------------------------------------


def text_loss(learner: PromptModel) -> torch.Tensor:
    features = learner.compute_text_features()
    return (features * torch.linspace(-1, 1, features.shape[-1])).sum()


@pytest.mark.parametrize("name", ["coop", "maple", "deep_lang", "ivlp"])
def test_checkpointed_chunks_give_the_gradients_of_one_pass(build, name: str) -> None:
    whole = build(name).train()
    chunked = build(name, text_chunk_size=3).train()
    checkpointed = build(name, text_chunk_size=3, text_checkpoint=True).train()
    reference = gradients(whole, text_loss(whole))
    by_chunks = gradients(chunked, text_loss(chunked))
    assert_same_gradients(by_chunks, reference)  # chunks: other matrix shapes, so float rounding differs
    recomputed = gradients(checkpointed, text_loss(checkpointed))
    assert all(torch.equal(recomputed[k], by_chunks[k]) for k in by_chunks)  # recomputation is bitwise


def saved_activation_bytes(run: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `run()` (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def test_checkpointing_keeps_a_chunk_of_activations_instead_of_all_classes(build) -> None:
    names = [f"class {i}" for i in range(24)]
    plain = build("coop", names=names, text_chunk_size=4).train()
    checkpointed = build("coop", names=names, text_chunk_size=4, text_checkpoint=True).train()
    kept_plain = saved_activation_bytes(lambda: text_loss(plain))
    kept_checkpointed = saved_activation_bytes(lambda: text_loss(checkpointed))
    assert kept_checkpointed * 4 < kept_plain


def test_cocoop_checkpointed_chunks_give_the_same_gradients(build) -> None:
    batch = {"image": images(3), "label": torch.tensor([0, 2, 5])}
    plain = build("cocoop", text_chunk_size=None).train()
    checkpointed = build("cocoop", text_chunk_size=5, text_checkpoint=True).train()
    grads = [gradients(m, sum(m.loss(batch, m(batch)).values())) for m in (plain, checkpointed)]  # type: ignore[arg-type]
    assert_same_gradients(grads[1], grads[0])


# -- batched CoCoOp -------------------------------------------------------------------------------------------


def test_batched_cocoop_equals_the_one_image_loop(build) -> None:
    batch = {"image": images(4), "label": torch.tensor([0, 1, 6, 3])}
    batched, looped = build("cocoop").train(), build("cocoop").train()
    output = batched(batch)
    torch.testing.assert_close(output.logits, cocoop_one_image_at_a_time(looped, batch).logits, rtol=0, atol=2e-5)
    reference = gradients(batched, sum(batched.loss(batch, output).values()))  # type: ignore[arg-type]
    looped.zero_grad()
    cocoop_loss_one_image_at_a_time(looped, batch)
    accumulated = {name: p.grad for name, p in looped.trainable_parameters().items()}
    assert_same_gradients(accumulated, reference)  # type: ignore[arg-type]


# -- DAPT: stop-gradient views without a graph, the others in the whole image's pass ---------------------------

# (learner, DAPT settings, epoch): both phases of the official schedule, the joint one, the release's step and
# a learner whose foreground class features depend on the foreground image.
DAPT_STEPS = {
    "official, pull-push epochs": ("maple", {}, 0),
    "official, alignment epochs": ("maple", {}, 7),
    "joint": ("maple", {"schedule": "joint"}, 0),
    "joint, compat released": ("maple", {"schedule": "joint", "compat": "released"}, 0),
    "joint, image-conditioned": ("cocoop", {"schedule": "joint"}, 0),
}


def dapt_batch() -> dict[str, torch.Tensor]:
    return {
        "image": images(3),
        "label": torch.tensor([0, 4, 2]),
        "mask": (torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(3)) > 0.5).float(),
    }


def dapt_learner(build: Callable[..., PromptModel], step: str) -> Any:
    method, settings, epoch = DAPT_STEPS[step]
    torch.manual_seed(0)
    learner = wrap_with_plugins(build(method), {"dapt": settings}).train()
    learner.on_epoch_start(epoch, 10)
    return learner


@pytest.mark.parametrize("step", list(DAPT_STEPS))
def test_dapt_targets_without_a_graph_give_bitwise_the_losses_and_gradients_of_keeping_it(build, step: str) -> None:
    batch = dapt_batch()
    fast, naive = dapt_learner(build, step), dapt_learner(build, step)
    fast_losses = fast.loss(batch, fast(batch))
    with dapt_targets_with_graph(naive):
        naive_losses = naive.loss(batch, naive(batch))
    assert "target_pass" not in naive.__dict__  # the naive path is undone
    assert fast_losses.keys() == naive_losses.keys() and len(fast_losses) > 1
    for name in fast_losses:
        assert torch.equal(fast_losses[name], naive_losses[name]), name
    fast_grads = gradients(fast, sum(fast_losses.values()))  # type: ignore[arg-type]
    naive_grads = gradients(naive, sum(naive_losses.values()))  # type: ignore[arg-type]
    assert any(g.abs().max() > 0 for g in fast_grads.values())
    for name in fast_grads:
        assert torch.equal(fast_grads[name], naive_grads[name]), name


@pytest.mark.parametrize("step", list(DAPT_STEPS))
def test_dapt_views_equal_one_pass_and_three_passes(build, step: str) -> None:
    batch = dapt_batch()
    fast = dapt_learner(build, step)
    output = fast(batch)
    reference = gradients(fast, sum(fast.loss(batch, output).values()))  # type: ignore[arg-type]
    for naive_path in ("one pass", "three passes"):
        naive = dapt_learner(build, step)
        if naive_path == "one pass":
            with dapt_one_graph_pass(naive):
                naive_output = naive(batch)
        else:
            naive_output = dapt_three_passes(naive, batch)
        for field in ("image_features", "foreground_features", "background_features"):
            torch.testing.assert_close(
                getattr(naive_output, field), getattr(output, field), rtol=0, atol=2e-5, msg=field
            )
        if "released" in step and naive_path == "three passes":
            continue  # the benchmarks' three-pass path is the default's step
        torch.testing.assert_close(naive_output.logits, output.logits, rtol=0, atol=2e-5)
        naive_loss = sum(naive.loss(batch, naive_output).values())
        assert_same_gradients(gradients(naive, naive_loss), reference, atol=2e-5)  # type: ignore[arg-type]


def test_background_sentences_are_tokenised_once_and_give_the_features_and_gradients_of_fresh_ids(
    build, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promptclip.methods import ivlp

    calls: list[int] = []
    tokenize = ivlp.tokenize
    monkeypatch.setattr(ivlp, "tokenize", lambda texts, **kw: calls.append(len(texts)) or tokenize(texts, **kw))
    learner = build("maple")
    sentences = ["a photo of the sky.", "a photo of grass.", "a photo of a wall."]
    first = learner.encode_sentences(sentences)
    again = learner.encode_sentences(sentences)
    assert calls == [3], "the same sentences were tokenised again"
    learner._sentence_cache = None  # the path without the kept ids
    fresh = learner.encode_sentences(sentences)
    assert torch.equal(again, fresh) and torch.equal(first, fresh)
    params = list(learner.trainable_parameters().values())
    kept = torch.autograd.grad(again.sum(), params, allow_unused=True)
    fresh_grads = torch.autograd.grad(fresh.sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in kept), "the deep text prompts get no gradient"
    for a, b in zip(kept, fresh_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    learner.encode_sentences(sentences[:2])  # another list: tokenised
    assert calls == [3, 3, 2]


# -- DPC: stage-1 class features encoded once -----------------------------------------------------------------


def test_dpc_ranking_from_cached_features_equals_encoding_them_every_step(tiny_clip) -> None:
    learner = dpc_builder("coop", {"n_ctx": 4})(tiny_clip, NAMES, "a photo of a {}.")
    learner.train()
    batch = images(5)
    cached = [learner.stage1_scores(batch) for _ in range(2)]
    with dpc_rescoring(learner):
        encoded = learner.stage1_scores(batch)
    assert "stage1_class_features" not in learner.__dict__  # the naive path is undone
    assert torch.equal(cached[0], cached[1])
    torch.testing.assert_close(cached[0], encoded, rtol=0, atol=1e-6)


# -- PromptKD's teacher image features kept across epochs ---------------------------------------------------------


def test_promptkd_kept_teacher_features_give_the_loss_of_encoding_them_again(tiny_clip) -> None:
    learner = get_prompt_model(tiny_clip, {"method": "promptkd", "depth_vision": 2, "teacher_arch": ""}, NAMES)
    learner.train()
    batch = {"image": images(4), "label": torch.arange(4), PIXELS_KEY: [10, 11, 12, 13]}  # pixels that repeat
    first = learner.loss(batch, learner(batch))["kd"]  # encodes and keeps
    kept = learner.loss(batch, learner(batch))["kd"]
    assert learner.teacher_cache.hits == 4
    with promptkd_teacher_every_epoch(learner):
        encoded = learner.loss(batch, learner(batch))["kd"]
    assert learner.teacher_cache.hits == 4 and len(learner.teacher_cache.rows) == 4  # the naive path is undone
    assert torch.equal(first, kept) and torch.equal(kept, encoded)  # the same batch: bitwise


# -- decoded few-shot images kept in memory --------------------------------------------------------------------


def batches(loader: Any, epoch: int) -> Iterator[dict[str, Any]]:
    loader.set_epoch(epoch)
    yield from loader


def test_images_decoded_once_give_the_batches_of_decoding_every_epoch() -> None:
    train = [Datum(f"train/{c}_{i}", c, n) for c, n in enumerate(NAMES) for i in range(2)]
    splits = DatasetSplits("noise", None, list(NAMES), "a photo of a {}.", train, [], [], reader=NoiseReader(size=24))
    options = {"batch_size": 4, "image_size": 16, "seed": 3}
    kept = build_loader(splits, "train", in_memory=True, **options)  # type: ignore[arg-type]
    reads = splits.reader.reads
    decoded = build_loader(splits, "train", **options)  # type: ignore[arg-type]
    for epoch in (0, 1):
        for a, b in zip(batches(kept, epoch), batches(decoded, epoch), strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert reads == len(train)  # decoded once, up front
    assert splits.reader.reads == reads + 2 * len(train) - (len(train) % 4) * 2  # drop_last leaves some out
