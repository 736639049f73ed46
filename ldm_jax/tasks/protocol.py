"""The Task interface: what the training loop, ``ldm_jax.sample`` and ``ldm_jax.evaluate`` ask of a task.

A task is built from a validated config (``ldm_jax.tasks.build_task``). The training loop needs only ``Task``;
sampling and evaluation of a trained workdir need ``GenerativeTask`` (latent diffusion) or ``ReconstructionTask``
(the first stage). None of these callers branch on ``config.task``: what differs between tasks lives in the task.

Latent diffusion tasks are one class (``LatentDiffusionTask``) composed of two parts, chosen per ``config.task`` in
``ldm_jax.tasks.TASKS``: a conditioner (text, class label, noise level or none; ``tasks/conditioners.py``) and a
concat input (inpainting mask, low-resolution image or none; ``tasks/concat_inputs.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import numpy as np

# init_state(rng, params=None) -> the training state: ``params`` given (a run's ``init_from`` weights, adapted and
# checked by the loop), the state is built around them and the random init they replace is never compiled or run
# (jax.eval_shape traces it, for the state's shapes);
# step(state, frozen, batch, rng) -> (state, metrics); see training/steps.py
InitFn = Callable[..., Any]
StepFn = Callable[[Any, Any, dict, jax.Array], tuple[Any, dict]]


@runtime_checkable
class Task(Protocol):
    """What ``training.loop.train_and_evaluate`` needs."""

    config: Any
    # What a training batch carries beside "image": "tokens" when ``tokenizer`` is set, "label" (the dataset's class
    # id under this labeling, see data.shapes.LABELINGS) when ``label_field`` is set.
    tokenizer: Any
    label_field: str | None

    def setup(self, meta: dict) -> tuple[dict, dict]:
        """Loads what the step needs but does not train (first stage, frozen text encoder, LPIPS network) from
        the workdir's checkpoint metadata ``meta`` ({} for a new run): returns (frozen tree, metadata to save)."""

    def train_loader(self, start_step: int) -> Any:
        """This process's share of every training batch from global batch ``start_step`` on (an iterable of dicts
        of numpy arrays; ``data.pipeline.make_loader``)."""

    def make_step(self, num_steps: int) -> tuple[InitFn, StepFn]:
        """(init_state, the pure step function to jit) for a run of ``num_steps`` steps."""

    # Whether ``config.init_from`` initialises the trained params (the loop loads them, through
    # ``adapt_init_params``); False when ``setup`` reads it instead (a LoRA run's frozen base).
    trains_from_init: bool

    def adapt_init_params(self, params: dict) -> dict:
        """Weights read from ``config.init_from`` -> this task's parameter tree (e.g. a txt2img UNet widened for an
        inpainting model's extra input channels); the loop then checks their shapes."""

    def preview(self, params, frozen, mesh) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Images (uint8 grids by name) and scalar metrics of the EMA weights, during training."""

    eval_every: int  # steps between ``periodic_eval`` calls during training; 0 = none

    def periodic_eval(self, params, frozen, mesh) -> dict[str, float]:
        """Scalar metrics of the EMA weights (``eval/...``), every ``eval_every`` steps during training."""


@dataclasses.dataclass(frozen=True)
class SampleInputs:
    """The inputs of an ``ldm_jax.sample`` run, as given (None / empty when not given)."""

    prompts: tuple[str, ...] = ()
    negative_prompt: str | None = None
    class_labels: tuple[int, ...] = ()
    num_images: int = 8
    low_res_images: tuple[str, ...] = ()  # file paths
    noise_level: int | None = None
    init_image: str = ""  # file path
    mask_image: str = ""  # file path
    strength: float | None = None
    image_size: int = 0  # 0: the run's


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What to generate, resolved by a task from ``SampleInputs``: one entry of ``conditions`` per source (prompt,
    class, low-resolution image...), ``repeats`` images of each."""

    conditions: list
    describe: list[dict]  # per source, what the manifest records (prompt, class name, input file...)
    repeats: bool  # whether --num_per_prompt applies (not to unconditional models: --num_images counts)
    negative: Any = None
    images: dict = dataclasses.field(default_factory=dict)  # "init", "mask" (one for all), "low_res" (per source)
    strength: float = 1.0
    image_size: int = 0  # the output size the inputs imply (super-resolution); 0: the run's or --image_size


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """The options of an ``ldm_jax.evaluate`` run that some task kinds take (None / False / "" when not given)."""

    split: str
    num_examples: int
    seed: int
    batch_size: int
    guidance_scale: float | None = None
    num_steps: int | None = None
    sampler: str | None = None
    inpaint: bool = False
    strength: float | None = None
    noise_level: int | None = None
    fid_weights: str = ""
    lpips_vgg_weights: str = ""

    def given(self) -> dict[str, Any]:
        """The task-specific options that were set, by flag name."""
        optional = ("guidance_scale", "num_steps", "sampler", "inpaint", "strength", "noise_level", "fid_weights")
        return {
            k: getattr(self, k) for k in optional + ("lpips_vgg_weights",) if getattr(self, k) not in (None, False, "")
        }


@runtime_checkable
class EvaluableTask(Protocol):
    """What ``ldm_jax.evaluate`` needs: every task kind scores its own workdir."""

    EVAL_OPTIONS: tuple[str, ...]  # the EvalInputs fields beyond split/num_examples/seed/batch_size it takes

    def evaluate_workdir(self, workdir: str, inputs: EvalInputs) -> tuple[dict, np.ndarray, str]:
        """(result, preview grid, result name) of the workdir's EMA weights on ``inputs.split``."""


@runtime_checkable
class GenerativeTask(Task, EvaluableTask, Protocol):
    """What ``ldm_jax.sample`` needs beyond training (latent diffusion tasks)."""

    def sample_request(self, inputs: SampleInputs) -> SampleRequest:
        """Resolves and checks the sampling inputs (ValueError naming the flag) before any weights load."""

    def generate_images(self, params, frozen, mesh, conditions, seeds, options, *args, **kwargs) -> np.ndarray:
        """uint8 images for ``conditions[i]`` with ``seeds[i]`` (see ``LatentDiffusionTask.generate_images``)."""

    def generate_batches(self, params, frozen, mesh, conditions, seeds, options, *args, **kwargs):
        """The same, batch by batch as global arrays (see ``LatentDiffusionTask.generate_batches``)."""


def frozen_input_changes(saved: dict, now: dict) -> list[str]:
    """For each frozen input that ``Task.setup`` records by fingerprint (``meta["frozen_inputs"]``: a latent task's
    first stage), a line naming it when its weights now differ from those the checkpoint's ``saved`` metadata
    recorded (trained on since, or replaced under the same path). Checkpoints from before the record: none."""
    out = []
    for name, current in (now.get("frozen_inputs") or {}).items():
        old = ((saved or {}).get("frozen_inputs") or {}).get(name)
        if old and old.get("fingerprint") != current["fingerprint"]:
            out.append(
                f"{current['field']}={current['path']!r} holds other weights (step {current['step']}) than the "
                f"{name} the run was trained with ({old['path']} at step {old['step']})"
            )
    return out
