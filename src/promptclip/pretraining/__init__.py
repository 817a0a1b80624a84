"""Contrastive image-caption pretraining of a tiny CLIP on the synthetic world.

The bundled `tiny-synthetic` model is trained by this package: a small ViT image tower and a causal text tower
(CLIP's real BPE ids) learn from an endless stream of rendered scenes and their captions, the way CLIP learnt
from web pairs. Every colour, shape and scene of the downstream synthetic tasks appears in the captions, so
the "new" classes of a base-to-novel split are known to the backbone, as they are to real CLIP.

Design choices:

* **Data as a pure function of the step.** Batch `s` is rendered from `sample_pretraining_specs` shards and a
  caption variant drawn from a generator seeded by `(seed, s)`, so a resumed run sees exactly the batches an
  uninterrupted one would, with no loader state in the checkpoint.
* **Shape twins.** Part of each batch repeats other images of the batch with only the shape changed, so the
  contrastive task cannot be solved from colour and texture alone (a ViT from scratch learns those first).
* **Captions.** The world's own captions (`synthetic.caption`: several sentence patterns and synonyms),
  none written to match the downstream prompts. Optionally (`partial_caption_prob`) a fraction name only
  some attributes ("a drawing of a star.", "a purple object on a snow background."); the shipped model
  does without them, because they make the hand-written class prompts so good that prompt tuning has
  nothing left to learn (docs/tiny-clip.md).
* **Loss.** Symmetric InfoNCE with a learnable temperature (logit scale clamped at 100). A caption that
  truly describes several images of the batch spreads its target uniformly over all of them (and each
  image over all captions that describe it); with only exact matches this is CLIP's loss.
* **Optimisation.** AdamW (CLIP's betas and eps, no weight decay on gains, biases, embeddings and the
  temperature), linear warm-up then cosine decay per step, gradient clipping.

Modules: `config` (settings and the bundled architecture), `batches` (captioned batches as a function of the
step), `objective` (loss, schedule, optimiser), `probes` (zero-shot checks on the downstream tasks), `loop`
(the training loop and its resumable checkpoint) and `export` (the shipped weights file).
"""

from promptclip.pretraining.batches import CaptionedBatch, attribute_caption, caption_batch, images_to_pixels
from promptclip.pretraining.config import TINY_SYNTHETIC_ARCH, PretrainConfig, PretrainError
from promptclip.pretraining.export import export_weights, zero_untrained_tokens
from promptclip.pretraining.loop import PretrainResult, pretrain, set_threads
from promptclip.pretraining.objective import clip_loss, learning_rate
from promptclip.pretraining.probes import ZeroShotProbe, build_probes, format_zero_shot_table, zero_shot_accuracy

__all__ = [
    "TINY_SYNTHETIC_ARCH",
    "CaptionedBatch",
    "PretrainConfig",
    "PretrainError",
    "PretrainResult",
    "ZeroShotProbe",
    "attribute_caption",
    "build_probes",
    "caption_batch",
    "clip_loss",
    "export_weights",
    "format_zero_shot_table",
    "images_to_pixels",
    "learning_rate",
    "pretrain",
    "set_threads",
    "zero_shot_accuracy",
    "zero_untrained_tokens",
]
