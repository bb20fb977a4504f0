"""Trainer and runtime settings of `python -m nvae_tf.train`.

`TrainConfig` holds what changes the optimisation (schedule lengths, seed,
checkpoint and logging cadence, NaN recovery); `RuntimeConfig` holds where
and on what the run executes (model directory, tf.distribute strategy,
precision, synchronized batch norm, graph optimisation), choices that do not
change the architecture; `RunLength` holds the step counts resolved once the
training split's size is known. They are sections of
`nvae_tf.experiment.ExperimentConfig` (`train`, `runtime`, `run`).

Step arithmetic: one step consumes one global batch (`DataConfig.batch_size`
images over all replicas; every replica and worker counts the same steps),
and every schedule is counted in these steps. With P = batches per pass over
the training split (`DataInfo.steps_per_epoch`):

    steps_per_epoch = TrainConfig.steps_per_epoch or P
    total_steps     = max_steps or epochs * steps_per_epoch
    schedule_epochs = ceil(total_steps / steps_per_epoch)

`total_steps` drives the KL warm-up and the lambda anneal; the learning rate
warms up over `warmup_epochs * steps_per_epoch` steps and then follows the
per-epoch cosine over `schedule_epochs` epochs, so a run shortened by
`max_steps` still ends at `learning_rate_min`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nvae_tf.config import ConfigError
from nvae_tf.fast.graph_options import GRAPPLER_CHOICES
from nvae_tf.layers.remat import REMAT_MODES

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
MIXED_PRECISION = ("none", "bfloat16", "float16")
# Official evaluation cadence: every epoch for runs of at
# most 50 epochs, otherwise every 20 epochs (and always at the end).
OFFICIAL_EVAL_EPOCHS_THRESHOLD = 50
OFFICIAL_EVAL_EVERY_LONG_RUNS = 20


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of a training run.

    Attributes:
      epochs: training epochs (official `--epochs`).
      warmup_epochs: epochs of linear LR warm-up from 0.
      learning_rate: peak learning rate of Adamax.
      learning_rate_min: final learning rate of the cosine decay.
      weight_decay: coupled L2 coefficient inside Adamax.
      steps_per_epoch: steps per epoch; 0 means one pass over the training
        split. A smaller value makes short "epochs" (evaluation, LR cosine
        and progress bar follow it; the data keep streaming).
      max_steps: if > 0, the run lasts this many steps instead of
        `epochs * steps_per_epoch` (schedules are compressed to it).
      seed: seed of the weights' initialisation, the data order, the data
        augmentation and the latent noise (official `--seed`).
      checkpoint_every_steps: save a checkpoint every this many steps;
        0 saves at the end of every epoch. Always also at step 0, after
        the last step, and kept atomically.
      keep_checkpoints: most recent checkpoints kept on disk.
      summary_every_steps: TensorBoard scalars and images every this many
        steps.
      eval_every_epochs: NELBO of the validation split (of the test split
        when there is none, as the official code) every this many epochs; 0
        uses the official cadence (1 if epochs <= 50, else 20). Always at
        the end.
      max_eval_images: evaluate at most this many images of a split (the
        first ones, in stored order); 0: all. For cheap tuning trials.
      final_test_eval: evaluate the test split once, after the last step.
        False never touches the test split (tuning trials); it needs a
        validation split.
      num_summary_images: samples per temperature and reconstructions in
        the TensorBoard image summaries.
      nan_patience: consecutive non-finite steps (skipped) after which the
        last checkpoint is restored and the learning rate lowered.
      nan_lr_factor: factor in (0, 1) applied to the learning rate at every
        recovery (persisted in the checkpoint).
      max_nan_recoveries: give up (raise) after this many recoveries.
      debug_inject_nan_at_step: test hook; if >= 0 the loss is made NaN at
        steps [N, N + nan_patience) until the first recovery.
      export: write a SavedModel at the end of training, to
        `<export_dir_base>/<export_name>/<step>` (TF Serving's layout).
      export_dir_base: folder of the exported models (relative paths are
        relative to the working directory: the repository's
        `saved_models/`).
      export_name: the model's serving name; empty: the model directory's
        base name.
    """

    epochs: int = 200
    warmup_epochs: int = 5
    learning_rate: float = 1e-2
    learning_rate_min: float = 1e-4
    weight_decay: float = 3e-4
    steps_per_epoch: int = 0
    max_steps: int = 0
    seed: int = 1
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 5
    summary_every_steps: int = 100
    eval_every_epochs: int = 0
    max_eval_images: int = 0
    final_test_eval: bool = True
    num_summary_images: int = 16
    nan_patience: int = 10
    nan_lr_factor: float = 0.5
    max_nan_recoveries: int = 5
    debug_inject_nan_at_step: int = -1
    export: bool = True
    export_dir_base: str = "saved_models"
    export_name: str = ""

    def __post_init__(self):
        def fail(field, expected):
            raise ConfigError.invalid(field, getattr(self, field), expected)

        for name, low in (("epochs", 1),
                          ("warmup_epochs", 0), ("steps_per_epoch", 0),
                          ("max_steps", 0), ("seed", 0),
                          ("checkpoint_every_steps", 0),
                          ("keep_checkpoints", 1),
                          ("summary_every_steps", 1),
                          ("eval_every_epochs", 0),
                          ("max_eval_images", 0),
                          ("num_summary_images", 1), ("nan_patience", 1),
                          ("max_nan_recoveries", 0),
                          ("debug_inject_nan_at_step", -1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) \
                    or value < low:
                fail(name, f"an integer >= {low}")
        for name in ("learning_rate", "learning_rate_min", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                fail(name, "a finite number >= 0")
        if self.learning_rate == 0:
            fail("learning_rate", "> 0")
        if self.learning_rate_min > self.learning_rate:
            fail("learning_rate_min",
                 f"<= learning_rate ({self.learning_rate})")
        if self.warmup_epochs >= self.epochs and self.max_steps == 0:
            fail("warmup_epochs", f"< epochs ({self.epochs}); the "
                 "official schedule needs at least one epoch after warm-up")
        if not isinstance(self.final_test_eval, bool):
            fail("final_test_eval", "True or False")
        if not 0.0 < self.nan_lr_factor < 1.0:
            fail("nan_lr_factor", "a factor in (0, 1)")
        if "/" in self.export_name:
            fail("export_name", "a folder name without '/'")

    def eval_every_epochs_resolved(self) -> int:
        if self.eval_every_epochs:
            return self.eval_every_epochs
        if self.epochs <= OFFICIAL_EVAL_EPOCHS_THRESHOLD:
            return 1
        return OFFICIAL_EVAL_EVERY_LONG_RUNS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunLength:
    """Step counts of a run, resolved once from the training split's size.

    Attributes:
      batches_per_pass: P, full global batches in one pass over the
        training split.
      steps_per_epoch: steps of one epoch (evaluation cadence, LR cosine).
      total_steps: steps of the whole run (drives the KL warm-up and the
        lambda anneal).
      schedule_epochs: epochs of the LR cosine.
      num_train / num_eval: examples of the training / test split.
      replicas: replicas of the strategy that trains.
      num_validation: examples of the validation split (0: none).
    """

    batches_per_pass: int
    steps_per_epoch: int
    total_steps: int
    schedule_epochs: int
    num_train: int = 0
    num_eval: int = 0
    replicas: int = 1
    num_validation: int = 0

    @classmethod
    def resolve(cls, train: TrainConfig, batches_per_pass: int,
                **facts) -> RunLength:
        """The run length of `train` over a split of `batches_per_pass`
        batches (module docstring); `facts`: the split sizes, replicas."""
        per_epoch = train.steps_per_epoch or batches_per_pass
        total = train.max_steps or train.epochs * per_epoch
        return cls(batches_per_pass=batches_per_pass,
                   steps_per_epoch=per_epoch, total_steps=total,
                   schedule_epochs=max(1, math.ceil(total / per_epoch)),
                   **facts)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def schedule(self) -> dict[str, int]:
        """The counts the LR and KL schedules are computed from."""
        return {name: getattr(self, name) for name in SCHEDULE_FIELDS}


# RunLength fields that shape the LR cosine and the KL warm-up, and the
# TrainConfig fields (flags) that set them.
SCHEDULE_FIELDS = ("steps_per_epoch", "total_steps", "schedule_epochs")
RUN_LENGTH_FLAGS = ("epochs", "max_steps", "steps_per_epoch")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and on what hardware a run executes.

    None of these changes the architecture: a run resumes with other values.

    Attributes:
      model_dir: run directory: config.json, checkpoints/, TensorBoard
        events (train/, eval/), eval_history.jsonl. Rerunning a command on the
        same directory resumes it.
      strategy: `auto` (multi_worker if TF_CONFIG names several tasks,
        mirrored over the local GPUs or logical CPUs if there are several,
        else one_device), `mirrored`, `multi_worker` or `one_device`.
      mixed_precision: `none` (float32), `bfloat16` or `float16` (with a
        dynamic loss scale, as the official GradScaler).
      jit_compile: compile the per-replica step with XLA (one replica only;
        slower on CPU).
      num_cpu_devices: if > 1, split the host CPU into this many logical
        devices (to run MirroredStrategy on a CPU-only machine).
      sync_batchnorm: batch statistics over all replicas, as the official
        SyncBatchNorm (the same as per-replica statistics with one replica).
      grappler: Grappler passes of the step functions: `auto` (resolved by
        `graph_options.resolve_grappler`: `lean` on a CPU-only host,
        `default` when a GPU or TPU is visible), `lean` (without the memory
        optimiser, TFG, layout, loop and implementation-selector passes;
        faster first step, less memory on a CPU) or `default` (TensorFlow's).
      require_checkpoint: fail if `model_dir` holds no checkpoint to resume
        (official `--cont_training`).
      remat: what the training step recomputes in the backward pass
        instead of keeping in memory (`NVAE(remat=...)`): `none`, `cells`
        (each residual cell) or `groups` (the cells of each latent group
        as one segment). Same loss and gradients; less memory, more time
        (docs: BUILD.md "Memory per image").
      run_eagerly: run the training step op by op instead of as a traced
        `tf.function` (Keras' `run_eagerly`): for models so large that the
        traced graph costs more host memory than their activations (with
        `remat`); slower per step on small models.
      extend_run: resume although the run length (epochs, max_steps,
        steps_per_epoch, or the batches per pass) differs from the saved
        one, e.g. to extend a finished run. The LR cosine and the KL
        warm-up are then those of the new length, at the resumed step.
        Without it such a resume is refused: the schedules would silently
        jump.
    """

    model_dir: str = "/tmp/nasvae/expr/eval-exp"
    strategy: str = "auto"
    mixed_precision: str = "none"
    jit_compile: bool = False
    num_cpu_devices: int = 0
    sync_batchnorm: bool = True
    grappler: str = "auto"
    require_checkpoint: bool = False
    remat: str = "none"
    run_eagerly: bool = False
    extend_run: bool = False

    def __post_init__(self):
        def fail(field, expected):
            raise ConfigError.invalid(field, getattr(self, field), expected)

        if not self.model_dir:
            fail("model_dir", "a directory")
        for name, choices in (("strategy", STRATEGIES),
                              ("mixed_precision", MIXED_PRECISION),
                              ("grappler", GRAPPLER_CHOICES)):
            if getattr(self, name) not in choices:
                fail(name, f"one of {', '.join(choices)}")
        for name in ("jit_compile", "sync_batchnorm", "require_checkpoint",
                     "run_eagerly", "extend_run"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if not isinstance(self.num_cpu_devices, int) or \
                self.num_cpu_devices < 0:
            fail("num_cpu_devices", "an integer >= 0")
        if self.remat not in REMAT_MODES:
            fail("remat", f"one of {', '.join(REMAT_MODES)}")
        if self.strategy == "one_device" and self.num_cpu_devices > 1:
            raise ConfigError(
                "num_cpu_devices",
                f"{self.num_cpu_devices} with strategy=one_device: the extra "
                "devices would be unused; use strategy mirrored (or auto).")
        if self.jit_compile and self.strategy in ("mirrored", "multi_worker"):
            raise ConfigError(
                "jit_compile",
                f"True with strategy={self.strategy}: XLA compilation is "
                "supported with one replica only (Keras 3/TF 2.21 fail on "
                "mirrored resources, keras#19005).")

    @property
    def keras_dtype_policy(self) -> str:
        return {"none": "float32", "bfloat16": "mixed_bfloat16",
                "float16": "mixed_float16"}[self.mixed_precision]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
