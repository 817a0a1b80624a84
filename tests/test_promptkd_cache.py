"""PromptKD's teacher image features kept across epochs when the training pixels repeat, and the loader's pixel
keys that say when they do."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_promptkd import prompted_teacher

from promptclip.config import ConfigError, build_run_config
from promptclip.data.crop_cache import CropCache
from promptclip.data.datasets import build_dataset
from promptclip.data.datasets.base import DatasetSplits, Datum
from promptclip.data.loader import PIXELS_KEY, EpochLoader, build_loader
from promptclip.engine.distributed import DataParallel, ShardedTrainLoader
from promptclip.methods.base import PromptModel
from promptclip.methods.promptkd import PromptKD, PromptKDConfig

IMAGE_SIZE = 32
BATCH = 4
ROW_BYTES = 40 * 4  # one fp32 image feature of the 40-wide teacher


def clip_arch(kind: str) -> dict[str, Any]:
    """Student and teacher differ in width (the teacher's embedding is 40 wide, the student's 24)."""
    vision_width, text_width, embed = {"student": (48, 32, 24), "teacher": (64, 48, 40)}[kind]
    return {
        "name": f"tiny-{kind}",
        "embed_dim": embed,
        "vision": {"image_size": IMAGE_SIZE, "width": vision_width, "layers": 2, "heads": 2, "patch_size": 8},
        "text": {"width": text_width, "heads": 2, "layers": 2},
    }


@pytest.fixture(scope="module")
def shapes() -> DatasetSplits:
    """40 training images of 10 classes (ten batches), with masks (a batch with masks is served like any other)."""
    return build_dataset(
        "synthetic_shapes", None, train_per_class=4, val_per_class=1, test_per_class=1, image_size=IMAGE_SIZE
    )


@pytest.fixture
def make_teacher(tiny_clips, shapes: DatasetSplits) -> Callable[[], PromptModel]:
    """A prompted teacher (PromptSRC layout) with trained-looking prompts on a wider CLIP than the student's; the
    same values at every call, in tensors of its own."""

    def build() -> PromptModel:
        torch.manual_seed(1)  # the same teacher at every call
        return prompted_teacher(tiny_clips(clip_arch("teacher"), 1), shapes.classnames, 1)

    return build


@pytest.fixture
def make_student(tiny_clips, shapes: DatasetSplits, make_teacher) -> Callable[..., PromptKD]:
    """make_student(teacher, **cfg): a PromptKD student in training mode; the same student for every call."""

    def build(teacher: PromptModel | None = None, **cfg: Any) -> PromptKD:
        full = PromptKDConfig(**{"depth_vision": 2, **cfg})
        teacher = teacher if teacher is not None else make_teacher()
        torch.manual_seed(5)
        return PromptKD(tiny_clips(clip_arch("student"), 0), shapes.classnames, full, teacher=teacher).train()

    return build


def loader_of(
    splits: DatasetSplits, *, augment: bool = False, shuffle: bool = True, batch_size: int = BATCH, **options: Any
) -> EpochLoader:
    """A training loader (drop_last) of `splits`, without augmentation unless asked for."""
    return build_loader(
        splits,
        "train",
        batch_size=batch_size,
        image_size=IMAGE_SIZE,
        seed=3,
        augment=augment,
        shuffle=shuffle,
        **options,
    )


def epoch(loader: Any, number: int) -> list[dict[str, Any]]:
    loader.set_epoch(number)
    return list(loader)


class TeacherPasses:
    """Counts the images of every pass of the teacher's image side."""

    def __init__(self, teacher: PromptModel) -> None:
        self.images: list[int] = []
        original = teacher.image_features

        def counting(images: torch.Tensor) -> torch.Tensor:
            self.images.append(images.shape[0])
            return original(images)

        teacher.image_features = counting  # type: ignore[method-assign]

    def take(self) -> list[int]:
        passes, self.images = self.images, []
        return passes


def sgd_epoch(student: PromptKD, batches: list[dict[str, Any]]) -> None:
    optimizer = torch.optim.SGD(list(student.trainable_parameters().values()), lr=0.01, momentum=0.9)
    for batch in batches:
        optimizer.zero_grad()
        sum(student.loss(batch, student(batch)).values()).backward()  # type: ignore[union-attr]
        optimizer.step()


def loss_and_gradient(student: PromptKD, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation loss of `batch` and its gradient over every trainable tensor, as one vector."""
    student.zero_grad()
    loss = student.loss(batch, student(batch))["kd"]
    loss.backward()
    grads = [p.grad.flatten() for p in student.trainable_parameters().values() if p.grad is not None]
    return loss.detach(), torch.cat(grads)


# -- the loader's pixel keys ------------------------------------------------------------------------------------


def keys_by_index(batches: list[dict[str, Any]]) -> dict[int, int]:
    return {i: k for batch in batches for i, k in zip(batch["index"].tolist(), batch[PIXELS_KEY], strict=True)}


class NoisePhotos:
    """A reader of random pictures (one per path): a dataset whose crops a `CropCache` keeps."""

    def load_image(self, datum: Datum) -> Image.Image:
        rng = np.random.default_rng(sum(datum.path.encode()))
        return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), mode="RGB")


def read_splits(count: int = 12) -> DatasetSplits:
    train = [Datum(f"train/{i}.png", i % 2, f"c{i % 2}") for i in range(count)]
    return DatasetSplits("noise", None, ["c0", "c1"], "a photo of a {}.", train, [], [], reader=NoisePhotos())


def test_keys_name_an_image_the_same_at_every_epoch_and_no_other_image_of_the_process(shapes) -> None:
    first, second = loader_of(shapes), loader_of(shapes)  # two datasets over the same images
    epoch0, epoch1 = epoch(first, 0), epoch(first, 1)
    assert [b["index"].tolist() for b in epoch0] != [b["index"].tolist() for b in epoch1]  # shuffled
    keys = keys_by_index(epoch0)
    assert keys == keys_by_index(epoch1)
    assert len(set(keys.values())) == len(shapes.train)
    other = keys_by_index(epoch(second, 0))
    assert set(other) == set(keys) and not set(other.values()) & set(keys.values())
    # The keys are plain ints on the host, so reading them after the batch moved waits for no device.
    assert all(type(key) is int for key in keys.values())


def test_every_loader_path_gives_the_keys_and_random_crops_give_none(shapes) -> None:
    splits = read_splits()
    crops = CropCache(max_bytes=2**20)
    kept = loader_of(splits, crop_cache=crops)  # read, then kept crops
    read, served = epoch(kept, 0), epoch(kept, 1)
    assert crops.hits == len(splits.train)  # epoch 1 came from the kept crops
    assert keys_by_index(read) == keys_by_index(served) and len(keys_by_index(read)) == len(splits.train)
    finished = loader_of(splits, crop_cache=None, pixels="uint8", device="cpu")  # finished on a device
    plain = loader_of(splits, crop_cache=None)  # the DataLoader alone
    assert len(keys_by_index(epoch(finished, 0))) == len(keys_by_index(epoch(plain, 0))) == len(splits.train)
    workers = loader_of(shapes, num_workers=2)
    assert all(len(b[PIXELS_KEY]) == b["image"].shape[0] for b in epoch(workers, 0))
    for loader in (loader_of(shapes, augment=True), loader_of(splits, augment=True, crop_cache=None)):
        assert not any(PIXELS_KEY in batch for batch in epoch(loader, 0))
    evaluation = build_loader(shapes, "test", batch_size=BATCH, image_size=IMAGE_SIZE)  # centre crops
    assert all(PIXELS_KEY in batch for batch in evaluation)


def test_a_data_parallel_share_carries_the_keys_of_its_own_images(shapes) -> None:
    loader = loader_of(shapes)
    whole = epoch(loader, 2)
    shares = [epoch(ShardedTrainLoader(loader, DataParallel(r, 2, r, torch.device("cpu"))), 2) for r in range(2)]
    for batch, (first, second) in zip(whole, zip(*shares, strict=True), strict=True):
        assert first[PIXELS_KEY] + second[PIXELS_KEY] == batch[PIXELS_KEY]
        for share in (first, second):
            assert len(share[PIXELS_KEY]) == share["image"].shape[0] < batch["image"].shape[0]
            assert keys_by_index([share]) == {i: keys_by_index(whole)[i] for i in share["index"].tolist()}
    # Evaluation ranks take whole batches, keys included.
    evaluation = build_loader(shapes, "test", batch_size=BATCH, image_size=IMAGE_SIZE)
    rank_batches = list(DataParallel(1, 2, 1, torch.device("cpu")).shard_eval_loader(evaluation))
    assert [b[PIXELS_KEY] for b in rank_batches] == [b[PIXELS_KEY] for b in list(evaluation)[1::2]]


# -- the teacher cache --------------------------------------------------------------------------------------------


def two_epochs(student: PromptKD, loader: EpochLoader) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
    """Epoch 0 trained with SGD, then epoch 1's batches; with the teacher passes of each."""
    passes = TeacherPasses(student.teacher)
    sgd_epoch(student, first := epoch(loader, 0))
    yield first, passes.take()
    yield epoch(loader, 1), passes.take()


@pytest.mark.parametrize("shuffle", [False, True])
def test_second_epoch_runs_no_teacher_image_pass_and_trains_as_without_the_cache(
    make_student, make_teacher, shapes, shuffle: bool
) -> None:
    cached, uncached = make_student(make_teacher()), make_student(make_teacher(), teacher_cache_mb=0)
    loader = loader_of(shapes, shuffle=shuffle)
    steps = len(loader)
    (_, cached_passes0), (batches, _) = two_epochs(cached, loader)
    (_, uncached_passes0), (same_batches, _) = two_epochs(uncached, loader)
    assert cached_passes0 == uncached_passes0 == [BATCH] * steps
    assert len(cached.teacher_cache.rows) == steps * BATCH
    cached_passes = TeacherPasses(cached.teacher)
    uncached_passes = TeacherPasses(uncached.teacher)
    for batch, again in zip(batches, same_batches, strict=True):
        loss, grad = loss_and_gradient(cached, batch)
        reference_loss, reference_grad = loss_and_gradient(uncached, again)
        if not shuffle:
            # The same batch companions as in epoch 0: the teacher would compute the very same features.
            assert torch.equal(loss, reference_loss) and torch.equal(grad, reference_grad)
        else:
            # Other companions: the teacher's features may round differently in the last bit (fp32, unit
            # roundoff 6e-8) after its ~100-term sums, i.e. ~1e-6 relative; softmax and the KL are Lipschitz,
            # so loss and gradient move by about as much. 2e-5 leaves a margin of 20; a row of another image
            # changes them by order 1.
            torch.testing.assert_close(loss, reference_loss, rtol=2e-5, atol=0)
            assert (grad - reference_grad).norm() <= 2e-5 * reference_grad.norm()
    assert cached_passes.take() == [] and uncached_passes.take() == [BATCH] * steps
    assert cached.teacher_cache.hits == steps * BATCH


def held_bytes(student: PromptKD) -> int:
    """The memory behind the kept features: every distinct storage their rows live in."""
    storages = {row.untyped_storage().data_ptr(): row.untyped_storage() for row in student.teacher_cache.rows.values()}
    return sum(storage.nbytes() for storage in storages.values())


def test_random_crops_keep_nothing(make_student, shapes) -> None:
    student = make_student()
    loader = loader_of(shapes, augment=True)
    passes = TeacherPasses(student.teacher)
    for number in range(2):
        batches = epoch(loader, number)
        assert not any(PIXELS_KEY in batch for batch in batches)
        sgd_epoch(student, batches)
        assert passes.take() == [BATCH] * len(loader)
    assert not student.teacher_cache.rows and student.teacher_cache.hits == 0


def test_a_batch_with_an_image_not_yet_kept_is_encoded_whole_and_its_new_rows_kept(make_student, shapes) -> None:
    student = make_student()
    loader = loader_of(shapes, batch_size=6)  # 40 images: six batches of six, four images left out per epoch
    passes = TeacherPasses(student.teacher)
    sgd_epoch(student, first := epoch(loader, 0))
    seen = {i for batch in first for i in batch["index"].tolist()}
    assert len(student.teacher_cache.rows) == len(seen) == 36
    second = epoch(loader, 1)
    mixed = [batch for batch in second if not set(batch["index"].tolist()) <= seen]
    assert mixed, "epoch 1 must bring an image epoch 0 left out"
    passes.take()
    sgd_epoch(student, second)
    assert passes.take() == [6] * len(mixed)
    assert len(student.teacher_cache.rows) == len(seen | {i for b in second for i in b["index"].tolist()})
    # Memory: whole batches kept as they came, the few new rows of a mixed batch copied out of theirs (a view
    # would hold its whole batch): the bytes counted are the bytes held.
    assert student.teacher_cache.nbytes == len(student.teacher_cache.rows) * ROW_BYTES == held_bytes(student)


def test_a_teacher_with_trainable_tensors_gets_no_cache(make_student, shapes) -> None:
    student = make_student()
    loader = loader_of(shapes)
    sgd_epoch(student, epoch(loader, 0))
    assert student.teacher_cache.rows
    # A wrapper trains the teacher's prompts (DPC's also_tune): its features change at every step.
    student.teacher.get_parameter("text.ctx").requires_grad_(True)
    passes = TeacherPasses(student.teacher)
    sgd_epoch(student, epoch(loader, 1))
    assert passes.take() == [BATCH] * len(loader)
    assert not student.teacher_cache.rows and student.teacher_cache.hits == 0


def test_the_cache_follows_the_teacher_and_ignores_class_sets(make_student, make_teacher, shapes) -> None:
    student = make_student()
    loader = loader_of(shapes, shuffle=False)
    batches = epoch(loader, 0)
    sgd_epoch(student, batches)
    passes = TeacherPasses(student.teacher)
    student.set_classnames(["circle", "square"])  # the image features do not depend on the classes
    with torch.no_grad():
        student.teacher_logits(batches[0]["image"], batches[0][PIXELS_KEY])
    assert passes.take() == []
    student.set_classnames(shapes.classnames)
    # In evaluation the teacher encodes as always (the loss is a training step's).
    student.eval()
    with torch.no_grad():
        student.teacher_logits(batches[0]["image"], batches[0][PIXELS_KEY])
    assert passes.take() == [BATCH]
    student.train()
    # Changed teacher tensors (in place, or new storage behind the same tensor) drop every kept feature.
    prompt = student.teacher.get_parameter("vision.ctx")
    for change in (lambda: prompt.add_(0.1), lambda: setattr(prompt, "data", prompt.data * 1.1)):
        with torch.no_grad():
            change()
        with torch.no_grad():
            features = student.teacher_image_features(batches[0]["image"], batches[0][PIXELS_KEY])
        assert passes.take() == [BATCH] and len(student.teacher_cache.rows) == BATCH
        assert torch.equal(features, student.teacher.image_features(batches[0]["image"]))
        passes.take()
    # Another teacher: nothing of the first one's is served.
    student.teacher = make_teacher()
    passes = TeacherPasses(student.teacher)
    sgd_epoch(student, batches[:1])
    assert passes.take() == [BATCH]


def test_cache_is_derived_data_never_saved_nor_copied(make_student, shapes) -> None:
    student = make_student()
    sgd_epoch(student, epoch(loader_of(shapes), 0))
    assert student.teacher_cache.rows
    assert not any("cache" in name for name in [*student.state_dict(), *student.trainable_state()])
    copied = copy.deepcopy(student)
    assert not copied.teacher_cache.rows and copied.teacher_cache.max_bytes == student.teacher_cache.max_bytes


def test_memory_bound_is_respected_and_said_once(make_student, shapes, caplog: pytest.LogCaptureFixture) -> None:
    student = make_student()
    row_bytes = ROW_BYTES
    student.teacher_cache.max_bytes = 2 * BATCH * row_bytes + row_bytes  # two batches and a bit
    loader = loader_of(shapes, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="promptclip.promptkd"):
        sgd_epoch(student, epoch(loader, 0))
    assert (
        held_bytes(student) == student.teacher_cache.nbytes == 2 * BATCH * row_bytes <= student.teacher_cache.max_bytes
    )
    assert len(student.teacher_cache.rows) == 2 * BATCH
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "teacher_cache_mb" in caplog.records[0].getMessage() and len(caplog.records) == 1
    passes = TeacherPasses(student.teacher)
    sgd_epoch(student, epoch(loader, 1))
    assert passes.take() == [BATCH] * (len(loader) - 2)  # the first two batches are served


def test_cache_size_is_checked_where_the_config_is_built() -> None:
    with pytest.raises(ConfigError, match=r"method_cfg\.teacher_cache_mb: -1 must be 0 .* or more"):
        build_run_config({"method": "promptkd", "method_cfg": {"teacher_cache_mb": -1}})
    assert PromptKDConfig(teacher_cache_mb=0).teacher_cache_mb == 0
