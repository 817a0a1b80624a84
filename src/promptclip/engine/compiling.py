"""Compiling the training step's towers: `torch.compile` of every CLIP tower a learner holds, on while it trains.

A training run keeps its shapes from step to step (a fixed batch with `drop_last`, one class set, fixed prompt
lengths), so each tower is traced once and its compiled form replayed at every step. `reduce-overhead`
also records the compiled kernels as CUDA graphs: a tower's forward becomes one launch instead of hundreds,
which is what a GPU step at the recipes' small batches is bound by (docs/performance.md). Evaluation runs the
eager towers: its class sets and batch sizes differ, and a compiled graph per shape would cost more than it
saves in one pass.

The engine knows no method: it finds the towers as the `visual` and `transformer` modules of every `CLIP`
inside the learner (the backbone, a teacher), whatever wraps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import torch
from torch import nn

from promptclip.engine.evaluate import clips_in
from promptclip.engine.learner import Learner

CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
# `torch.compile`'s backend: inductor (fused kernels) unless a caller asks for another, e.g. "eager" (the
# capture alone, which tests use to check the wiring without a C++ toolchain).
DEFAULT_BACKEND = "inductor"


def towers(learner: Learner | nn.Module) -> list[nn.Module]:
    """The image tower and the text transformer of every distinct CLIP inside `learner` (or a CLIP itself)."""
    return [tower for clip in clips_in(learner) for tower in (clip.visual, clip.transformer)]


class CompiledTowers:
    """The compiled forwards of a learner's towers, made once and installed for as long as `installed()`
    lasts; outside it every tower runs its own eager `forward`.

    With `reduce-overhead` on CUDA, the outputs of a replayed CUDA graph live in memory the next replay writes
    over; a learner may keep a tower's output across steps (class features encoded once per class set), so
    each output is copied out of that memory, and every step opens with `step_begins()`."""

    def __init__(
        self, learner: Learner | nn.Module, mode: CompileMode, backend: str | Callable[..., Any] | None = None
    ) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"model.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.mode = mode
        self._graphs = mode == "reduce-overhead"
        self._towers = towers(learner) if mode != "off" else []
        chosen = backend if backend is not None else DEFAULT_BACKEND
        options: dict[str, Any] = {"backend": chosen, "dynamic": False}
        if chosen == "inductor":
            options["mode"] = None if mode == "default" else mode
        self._compiled = [self._compile(tower, options) for tower in self._towers]

    def _compile(self, tower: nn.Module, options: dict[str, Any]) -> Callable[..., Any]:
        compiled = torch.compile(tower.forward, **options)  # the class's forward, bound before any is installed
        if not self._graphs:
            return compiled
        return lambda *args, **kwargs: compiled(*args, **kwargs).clone()

    def install(self) -> None:
        """Each tower's `forward` becomes its compiled one (an instance attribute over the class's method)."""
        for tower, forward in zip(self._towers, self._compiled, strict=True):
            tower.forward = forward  # type: ignore[method-assign]

    def remove(self) -> None:
        """Each tower runs its own eager `forward` again."""
        for tower in self._towers:
            tower.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The compiled forwards inside the block, the eager ones after it, whatever the block raised."""
        self.install()
        try:
            yield
        finally:
            self.remove()

    def step_begins(self) -> None:
        """Tell the CUDA graphs that a new step starts: the outputs of the last one are no longer read."""
        if self._graphs and torch.cuda.is_available():
            mark_step_begin()


def mark_step_begin() -> None:
    """A new training step: CUDA graphs recorded by `reduce-overhead` may write over the last step's outputs.
    Without compiled graphs it only counts a generation, so a benchmark may call it at every step."""
    torch.compiler.cudagraph_mark_step_begin()
