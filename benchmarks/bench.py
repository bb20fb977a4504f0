"""Benchmark of NVAE training, evaluation and sampling on synthetic data.

    python -m benchmarks.bench [--config=mnist-small|cifar-small|FLAGFILE]
        [--batch_size=N] [--steps=20] [--warmup=2] [--repeats=3] [--json]

The flags are absl's (`--helpshort` lists them; a bad value is one line
naming the flag, `--verbosity=1` shows the traceback of an error).

For every config and repeat a fresh Python process builds the model and
times (`--steps` calls after `--warmup` untimed ones, the first of which
traces and optimises the graph) each of three `tf.function`s:

  * `train_step`: the trainer's step (`nvae_tf.training.step`, with the
    trainer's default settings and strategy): forward, the full objective
    (`objectives.compute_loss` with KL warm-up and balancing active and
    spectral + BN regularisation on, lambda = 1e-2 as in the README runs),
    backward, the finite check and the Adamax update, on a dataset that
    repeats one batch;
  * `eval`: eval-mode forward and the mean NELBO (no gradient tape);
  * `sample`: `model.sample(batch, 1.0)` with a fixed batch.

`eval` and `sample` draw fresh stateless noise every call and, as in
`python -m nvae_tf.evaluate`, read the weights as graph constants
(`nvae_tf.fast.constant_weights`; `--weights=variables` reads the variables).

Inputs are synthetic tensors of the dataset's shape and range (binary for
MNIST, the 8-bit grid otherwise) made before timing: no data loading is
timed. Training and inference run as a training process and an inference
process do (`python -m nvae_tf.train`, `python -m nvae_tf.evaluate`): a
repeat is two processes, one timing `train_step` with TensorFlow's
threads, one timing `eval` and `sample` with the batch cut into one shard
per core (`--inference_shards`, `nvae_tf.fast.inference_shards`: 1 intra-op thread,
one inter-op thread per shard); `--inference_shards=1` times all three
unsharded in one process with TensorFlow's threads or the thread flags.
The untimed setup of up to `--parallel_setup` repeats runs at the same
time; their timed calls run one process at a time. Per repeat the median,
minimum and median process CPU time over calls are recorded; the reported
figure is the median over repeats, with peak RSS (`ru_maxrss`, the larger
of the repeat's processes; also per process), parameter count, TF version
and thread settings: one JSON object per config and line with `--json`,
else a table against the official PyTorch figures (`REFERENCE`). Each
function's multiply-adds (`*_gmacs`, `benchmarks.multiply_adds`) divided by
the fastest float32 multiply-add rate the workers measure
(`peak_gmacs_per_s`) give its arithmetic floor (`*_bound_s`): the time no
setting can beat without changing the arithmetic. A FLAGFILE is a trainer
flagfile (`configs/*.cfg`, a path or a packaged name as in
`--flagfile=NAME`), read with `nvae_tf.training.flags`; `--flagfile=F` is
`--config=F` here (`benchmarks.command_line`). `--jit_compile` and
`--mixed_precision` measure the alternatives to the default float32,
non-XLA path, `--remat=cells|groups` the training step with recomputation
(`NVAE(remat=...)`). `--grappler=default` optimises the graphs with all of
TensorFlow's default Grappler passes instead of the `lean` set
(`nvae_tf.fast.graph_options.GRAPPLER`).
`--memory` runs `benchmarks.memory` instead (the allocator's bytes of one
training step; its flags). See docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from benchmarks import command_line
from benchmarks import multiply_adds
from nvae_tf import flagfiles
from nvae_tf.fast import inference_shards
from nvae_tf.fast.inference_shards import configure_shard_threads, resolve_shards
from nvae_tf.config import NVAEConfig
from nvae_tf.fast.constant_weights import with_constant_weights
from nvae_tf.fast.graph_options import GRAPPLER, set_grappler_options
from nvae_tf.layers.remat import REMAT_MODES

# Benchmark presets: (model config, batch size). Parameter counts match the
# official code for the same flags (issue 7).
PRESETS = {
    "mnist-small": (NVAEConfig(
        dataset="mnist", num_channels_enc=16, num_channels_dec=16,
        num_latent_scales=2, num_groups_per_scale=5, ada_groups=True,
        num_latent_per_group=20, num_cell_per_cond_enc=1,
        num_cell_per_cond_dec=1, num_preprocess_blocks=2,
        num_postprocess_blocks=2, num_preprocess_cells=2,
        num_postprocess_cells=2, use_se=True, res_dist=True, num_nf=0), 32),
    "cifar-small": (NVAEConfig(
        dataset="cifar10", num_channels_enc=32, num_channels_dec=32,
        num_latent_scales=1, num_groups_per_scale=10,
        num_latent_per_group=20, num_cell_per_cond_enc=2,
        num_cell_per_cond_dec=2, num_preprocess_blocks=1,
        num_postprocess_blocks=1, num_preprocess_cells=2,
        num_postprocess_cells=2, use_se=True, res_dist=True, num_nf=1,
        num_mixture_dec=10), 16),
    # Hidden, for the harness' own smoke test: a few seconds per process.
    "tiny": (NVAEConfig(
        dataset="cifar10", image_size=8, num_channels_enc=8,
        num_channels_dec=8, num_latent_scales=2, num_groups_per_scale=2,
        num_latent_per_group=4, num_preprocess_blocks=1,
        num_postprocess_blocks=1, num_preprocess_cells=1,
        num_postprocess_cells=1, use_se=True, res_dist=True, num_nf=1,
        num_mixture_dec=3), 4),
}
PUBLIC_PRESETS = ("mnist-small", "cifar-small")

# Objective of the README runs: lambda = 1e-2 for spectral + BN regularisation.
WEIGHT_DECAY_NORM = 1e-2
# A long run, so that the timed steps are inside the KL warm-up (beta < 1),
# where KL balancing is active.
TOTAL_STEPS = 100_000
SEED = 1

# Reference timings of the official PyTorch code on this kind of machine
# (2 threads; issue 7): seconds and MB.
REFERENCE = {
    "mnist-small": dict(train_step_s=0.53, sample_s=0.050, eval_s=0.078,
                        peak_rss_mb=1084),
    "cifar-small": dict(train_step_s=1.13, sample_s=0.112, eval_s=0.22,
                        peak_rss_mb=2183),
}
TIMED = ("train_step", "eval", "sample")
# What a worker process times: everything, or training and inference in two
# processes (inference with one intra-op thread per batch shard).
PHASES = {"all": TIMED, "train": ("train_step",),
          "inference": ("eval", "sample")}

POLL_SECONDS = 0.05


# ------------------------------------------------------------------ configs
def resolve_config(name: str, batch_size: int | None = None):
    """(NVAEConfig, batch size, ObjectiveConfig) of a preset or flagfile.

    Presets use the README objective (lambda = `WEIGHT_DECAY_NORM`); a
    trainer flagfile (`python -m nvae_tf.train --flagfile=...`) gives its own
    model, global batch size and objective. In both cases the objective's run
    length is `TOTAL_STEPS`, so the timed steps are inside the KL warm-up.
    """
    from nvae_tf import objectives
    problem = config_problem(name)
    if problem:
        raise ValueError(f"--config: {problem}")
    if name in PRESETS:
        config, default_batch = PRESETS[name]
        objective = objectives.ObjectiveConfig(
            total_steps=TOTAL_STEPS, weight_decay_norm=WEIGHT_DECAY_NORM)
    else:
        config, default_batch, objective = _config_from_flagfile(
            flagfiles.resolve(name))
        objective = dataclasses.replace(objective, total_steps=TOTAL_STEPS)
    return config, batch_size or default_batch, objective


def config_problem(name: str) -> str | None:
    """What is wrong with a config name, or None: a preset, a flagfile path
    or a packaged flagfile's name (`nvae_tf.flagfiles.resolve`)."""
    if name in PRESETS:
        return None
    try:
        flagfiles.resolve(name)
        return None
    except flagfiles.FlagfileError:
        return (f"{name!r} is neither a preset ({', '.join(PUBLIC_PRESETS)})"
                f", a file, nor a packaged flagfile "
                f"({', '.join(flagfiles.available())})")


def _config_from_flagfile(path: str):
    """Model, global batch size and objective of a trainer flagfile."""
    from nvae_tf.training import flags as nvae_flags
    values = flags.FlagValues()
    nvae_flags.define_flags(values)
    values(["benchmarks.bench", f"--flagfile={path}"])
    experiment = nvae_flags.from_flags(values)
    return experiment.model, experiment.data.batch_size, experiment.objective


# ------------------------------------------------------------------- worker
def _synthetic_batch(config: NVAEConfig, batch_size: int, seed: int):
    """Images [B, H, W, C] in [0, 1]: binary, or on the num_x_bits grid."""
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = (batch_size,) + config.data_shape
    if config.is_binary:
        return (rng.random(shape) < 0.5).astype(np.float32)
    levels = 2 ** config.num_x_bits - 1
    return (rng.integers(0, levels + 1, shape) / levels).astype(np.float32)


def _peak_rss_mb() -> float:
    import resource
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_calls(fn, steps: int):
    """Wall and process CPU seconds of `steps` calls, each run to completion."""
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn().numpy()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def build_functions(config: NVAEConfig, batch_size: int, objective,
                    steps_per_epoch: int = 1000, jit_compile: bool = False,
                    shards: int = 1, training: bool = True,
                    constant_weights: bool = True, float16: bool = False,
                    remat: str = "none", run_eagerly: bool = False):
    """The model, optimizer and the three `tf.function`s the benchmark times.

    `train_step` is the trainer's (`nvae_tf.training.step.make_train_step`)
    with the trainer's defaults (`TrainConfig()`, the strategy of
    `python -m nvae_tf.train` on this machine, its seeded latent noise),
    over a dataset that repeats the batch.

    Args:
      config: the model.
      batch_size: images per call (also the fixed batch of `sample`).
      objective: `objectives.ObjectiveConfig` of the training step.
      steps_per_epoch: drives the learning-rate schedule (irrelevant to
        speed).
      jit_compile: compile `eval_step` and `sample`, and the training
        step's replica part as the trainer's `--jit_compile` does, with XLA
        (an option only: slower on this CPU, see docs/performance.md).
      shards: batch shards of `eval_step` and `sample` (`inference_shards`).
      training: build the optimizer and `train_step` (else both are None).
      constant_weights: trace `eval_step` and `sample` with the weights of
        the freshly built model as constants (`constant_weights`, as
        `python -m nvae_tf.evaluate` does), else reading the variables.
      float16: the model runs under the `mixed_float16` policy: the step
        scales the loss as the trainer's does.
      remat: recomputation of the training step (`NVAE(remat=...)`).
      run_eagerly: `train_step` runs the trainer's step op by op, as
        `--run_eagerly` does, instead of traced.

    Returns:
      (model, optimizer, train_step(x) -> loss, eval_step(x, seed) -> mean
      NELBO, sample(seed) -> images); `seed`: a stateless seed [2] (int64)
      of the call's noise; `train_step` is a `_RepeatedBatchStep`.
    """
    import contextlib
    import tensorflow as tf
    from nvae_tf.model import NVAE
    from nvae_tf.training import main as train_main
    from nvae_tf.training import step as step_lib
    from nvae_tf.training.config import RuntimeConfig, TrainConfig
    from nvae_tf.training.config import RunLength

    strategy = None
    if training:
        runtime = RuntimeConfig(jit_compile=jit_compile)
        strategy = train_main.make_strategy(runtime)
    with strategy.scope() if training else contextlib.nullcontext():
        model = NVAE(config, seed=SEED, remat=remat)
        model.build()
        if training:
            train = TrainConfig(steps_per_epoch=steps_per_epoch,
                                max_steps=objective.total_steps, seed=SEED)
            length = RunLength.resolve(train, steps_per_epoch)
            schedule, optimizer = step_lib.make_optimizer(
                train, length, model.trainable_variables)
            counters = step_lib.StepCounters.create(float16)
    compile_options = dict(jit_compile=True) if jit_compile else {}

    def mean_nelbo(x, seed):
        return tf.reduce_mean(
            inference_shards.forward(model, x, shards, seed=seed).nelbo)

    def sample_images(seed):
        return inference_shards.sample(model, batch_size, shards,
                                       seed=seed).images

    inference_fns = [mean_nelbo, sample_images]
    if constant_weights:
        inference_fns = [with_constant_weights(model, fn)
                         for fn in inference_fns]
    eval_step, sample = [tf.function(fn, reduce_retracing=True,
                                     **compile_options)
                         for fn in inference_fns]

    if not training:
        return model, None, None, eval_step, sample
    options = dataclasses.replace(
        step_lib.StepOptions.from_configs(train, runtime), float16=float16,
        run_eagerly=run_eagerly)
    step = step_lib.make_train_step(
        strategy, model, optimizer, schedule,
        dataclasses.replace(objective, total_steps=length.total_steps),
        counters, step_lib.seeded_latent_noise(train.seed), options)
    train_step = _RepeatedBatchStep(strategy, step)
    return model, optimizer, train_step, eval_step, sample


class _RepeatedBatchStep:
    """The trainer's step on a distributed dataset repeating one batch.

    `step(x)` runs one step on the next batch (the first call's `x`) and
    returns the loss; `get_concrete_function(x)` is the step's graph.
    """

    def __init__(self, strategy, step):
        self._strategy = strategy
        self._step = step
        self._batches = None

    def _iterator(self, x):
        if self._batches is None:
            import tensorflow as tf
            dataset = tf.data.Dataset.from_tensors(x).repeat()
            self._batches = iter(
                self._strategy.experimental_distribute_dataset(dataset))
        return self._batches

    def __call__(self, x):
        return self._step(self._iterator(x))["loss"]

    def get_concrete_function(self, x):
        return self._step.get_concrete_function(self._iterator(x))


def _wait_for_turn(sync_dir: str, index: int):
    """Signals 'ready' and blocks until the parent lets this worker time."""
    with open(os.path.join(sync_dir, f"ready.{index}"), "w",
              encoding="utf-8"):
        pass
    go = os.path.join(sync_dir, f"go.{index}")
    while not os.path.exists(go):
        time.sleep(POLL_SECONDS)


def run_worker(args: Options, config_name: str) -> dict:
    """One repeat of `config_name` in this process; returns a dict of its
    measurements.

    Setup (build, trace and first call of each function) may overlap with
    other workers' setup; with `--sync_dir` the worker then waits until the
    parent gives it the machine alone, runs the remaining warm-up calls and
    times `--steps` calls of each function.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    rss_stages = {"import": _peak_rss_mb()}  # the peak RSS, stage by stage
    shards = args.inference_shards if args.phase == "inference" else 1
    if shards > 1:
        configure_shard_threads(shards)
    else:
        if args.intra_op_threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(
                args.intra_op_threads)
        if args.inter_op_threads is not None:
            tf.config.threading.set_inter_op_parallelism_threads(
                args.inter_op_threads)
    if args.mixed_precision != "none":
        import keras
        keras.mixed_precision.set_global_policy(
            f"mixed_{args.mixed_precision}")
    config, batch_size, objective = resolve_config(config_name,
                                                   args.batch_size)
    tf.random.set_seed(SEED)
    set_grappler_options(GRAPPLER[args.grappler])

    start = time.perf_counter()
    model, _, train_step, eval_step, sample = build_functions(
        config, batch_size, objective, jit_compile=args.jit_compile,
        shards=shards, training=args.phase != "inference",
        constant_weights=args.weights == "constant",
        float16=args.mixed_precision == "float16",
        remat=args.remat)
    x = tf.constant(_synthetic_batch(config, batch_size, SEED))
    rss_stages["build"] = _peak_rss_mb()
    result = {"config": config_name, "batch_size": batch_size,
              "params": model.num_parameters(),
              "build_s": time.perf_counter() - start}
    calls = itertools.count()

    def seed():  # fresh noise for every call, as in evaluation
        return tf.constant([SEED, next(calls)], tf.int64)

    fns = {"train_step": lambda: train_step(x),
           "eval": lambda: eval_step(x, seed()),
           "sample": lambda: sample(seed())}
    timed = PHASES[args.phase]
    for name in timed:  # the first call traces and optimises the graph
        start = time.perf_counter()
        fns[name]().numpy()
        result[f"{name}_first_call_s"] = time.perf_counter() - start
    rss_stages["first_calls"] = _peak_rss_mb()
    if args.sync_dir:
        _wait_for_turn(args.sync_dir, args.index)
    load_start = os.getloadavg()[0]
    for name in timed:
        _time_calls(fns[name], args.warmup - 1)
        wall, cpu = _time_calls(fns[name], args.steps)
        result[f"{name}_s"] = statistics.median(wall)
        result[f"{name}_min_s"] = min(wall)
        result[f"{name}_cpu_s"] = statistics.median(cpu)
    result["peak_rss_mb"] = rss_stages["timed_calls"] = _peak_rss_mb()
    result[f"{args.phase}_rss_stages_mb"] = rss_stages
    traced = {"train_step": (train_step, x), "eval": (eval_step, x, seed()),
              "sample": (sample, seed())}
    for name in timed:  # the traced functions' arithmetic, untimed
        function, *arguments = traced[name]
        by_kind = multiply_adds.count(
            function.get_concrete_function(*arguments).graph)
        result[f"{name}_gmacs"] = sum(by_kind.values()) / 1e9
        result[f"{name}_gmacs_by_kind"] = {
            kind: round(value / 1e9, 4)
            for kind, value in sorted(by_kind.items())}
    result["peak_gmacs_per_s"] = multiply_adds.peak_rate(
        os.cpu_count() or 1) / 1e9
    if args.phase != "all":
        result[f"{args.phase}_peak_rss_mb"] = result["peak_rss_mb"]
    result["load_avg"] = [load_start, os.getloadavg()[0]]
    result["tf_version"] = tf.__version__
    threads = [tf.config.threading.get_intra_op_parallelism_threads(),
               tf.config.threading.get_inter_op_parallelism_threads()]
    if args.phase != "train":
        result["inference_shards"] = shards
        result["inference_threads"] = threads
    if args.phase != "inference":
        result["intra_op_threads"], result["inter_op_threads"] = threads
    result["onednn"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    result["jit_compile"] = args.jit_compile
    result["mixed_precision"] = args.mixed_precision
    result["grappler"] = args.grappler
    result["remat"] = args.remat
    if args.phase != "train":
        result["weights"] = args.weights
    result["cpu_count"] = os.cpu_count()
    return result


# ------------------------------------------------------------------- parent
def _phases(args) -> tuple:
    """The worker processes of one repeat."""
    return ("train", "inference") if args.inference_shards > 1 else ("all",)


def _worker_command(args, config_name: str, sync_dir: str, index: int,
                    phase: str):
    cmd = [sys.executable, "-m", "benchmarks.bench", "--worker",
           f"--config={config_name}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--sync_dir={sync_dir}",
           f"--index={index}", f"--phase={phase}",
           f"--inference_shards={args.inference_shards}"]
    if args.batch_size:
        cmd.append(f"--batch_size={args.batch_size}")
    if args.intra_op_threads is not None:
        cmd.append(f"--intra_op_threads={args.intra_op_threads}")
    if args.inter_op_threads is not None:
        cmd.append(f"--inter_op_threads={args.inter_op_threads}")
    if args.jit_compile:
        cmd.append("--jit_compile")
    cmd.append(f"--mixed_precision={args.mixed_precision}")
    cmd.append(f"--grappler={args.grappler}")
    cmd.append(f"--remat={args.remat}")
    cmd.append(f"--weights={args.weights}")
    return cmd


def _run_workers(args, config_name: str) -> list:
    """Runs the repeats: setups `--parallel_setup` at a time, timing alone.

    Each repeat is one worker process, or two (training; inference with
    batch shards) when `--inference_shards` > 1, run phase after phase.
    Workers are started in groups of `--parallel_setup`; each builds and
    compiles (CPU-bound, and not timed) concurrently with the others of its
    group, then waits. The parent lets one worker at a time run its timed
    calls while the others are blocked, so no timed call shares the machine
    with another worker.

    Returns:
      one dict per repeat (its workers' results merged).
    """
    phases = _phases(args)
    by_phase = {}
    with tempfile.TemporaryDirectory(prefix="nvae_bench_") as sync_dir:
        for j, phase in enumerate(phases):
            by_phase[phase] = []
            for first in range(0, args.repeats, args.parallel_setup):
                group = [j * args.repeats + i for i in range(
                    first, min(first + args.parallel_setup, args.repeats))]
                by_phase[phase] += _run_group(args, config_name, sync_dir,
                                              group, phase)
    return [_merge_phases([by_phase[phase][i] for phase in phases])
            for i in range(args.repeats)]


def _run_group(args, config_name: str, sync_dir: str, group: list,
               phase: str) -> list:
    """Starts the workers `group` together, then times them one by one."""
    procs = {i: subprocess.Popen(
        _worker_command(args, config_name, sync_dir, i, phase),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in group}
    try:
        for i in group:
            _wait_until_ready(procs[i], sync_dir, i, config_name)
        results = []
        for i in group:
            with open(os.path.join(sync_dir, f"go.{i}"), "w",
                      encoding="utf-8"):
                pass
            results.append(_collect(procs[i], config_name))
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _merge_phases(results: list) -> dict:
    """One repeat's result from its workers' (peak RSS: the largest)."""
    merged = {}
    for result in results:
        merged.update(result)
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    merged["peak_gmacs_per_s"] = max(r["peak_gmacs_per_s"] for r in results)
    merged["load_avg"] = [v for r in results for v in r["load_avg"]]
    return merged


def _wait_until_ready(proc, sync_dir: str, index: int, config_name: str):
    ready = os.path.join(sync_dir, f"ready.{index}")
    while not os.path.exists(ready):
        if proc.poll() is not None:
            _collect(proc, config_name)  # raises with the worker's error
        time.sleep(POLL_SECONDS)


def _collect(proc, config_name: str) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"benchmark worker for {config_name} failed "
                           f"(exit {proc.returncode}):\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_repeats(args, config_name: str) -> dict:
    """Runs `args.repeats` fresh worker processes; aggregates medians.

    Returns:
      dict with `config`, `params`, `train_step_s`, `eval_s`, `sample_s`
      (medians over repeats of the per-repeat median wall-clock seconds),
      `*_min_s` (minimum over all timed calls), `*_cpu_s` (median process
      CPU seconds per call), images/s, `peak_rss_mb` (median over repeats of
      the worker's peak RSS) and, per worker phase, the peak RSS after each
      stage (`<phase>_rss_stages_mb`: import, build, first calls, timed
      calls), the load average around each repeat's timed calls, the
      first-call (trace + graph optimisation) seconds, the multiply-adds
      of each function (`*_gmacs`, `*_gmacs_by_kind`), the fastest rate
      of any worker (`peak_gmacs_per_s`) and their quotient
      (`*_bound_s`), and the ratios of the times and floors to
      `REFERENCE`.
    """
    start = time.perf_counter()
    runs = _run_workers(args, config_name)
    summary = {key: runs[0][key] for key in (
        "config", "batch_size", "params", "tf_version", "intra_op_threads",
        "inter_op_threads", "inference_shards", "inference_threads",
        "onednn", "jit_compile", "mixed_precision", "grappler", "remat",
        "weights",
        "cpu_count")}
    summary["repeats"] = len(runs)
    summary["steps"] = args.steps

    def median(key, digits=4):
        return round(statistics.median(r[key] for r in runs), digits)

    for name in TIMED:
        summary[f"{name}_s"] = median(f"{name}_s")
        summary[f"{name}_min_s"] = round(min(r[f"{name}_min_s"]
                                             for r in runs), 4)
        summary[f"{name}_cpu_s"] = median(f"{name}_cpu_s")
        summary[f"{name}_s_per_repeat"] = [round(r[f"{name}_s"], 4)
                                           for r in runs]
    # The arithmetic floor: multiply-adds at this machine's fastest rate.
    summary["peak_gmacs_per_s"] = round(
        max(r["peak_gmacs_per_s"] for r in runs), 1)
    for name in TIMED:
        summary[f"{name}_gmacs"] = round(runs[0][f"{name}_gmacs"], 4)
        summary[f"{name}_gmacs_by_kind"] = runs[0][f"{name}_gmacs_by_kind"]
        summary[f"{name}_bound_s"] = round(
            summary[f"{name}_gmacs"] / summary["peak_gmacs_per_s"], 4)
    batch = summary["batch_size"]
    summary["train_images_per_s"] = round(batch / summary["train_step_s"], 1)
    summary["eval_images_per_s"] = round(batch / summary["eval_s"], 1)
    summary["sample_images_per_s"] = round(batch / summary["sample_s"], 1)
    summary["peak_rss_mb"] = median("peak_rss_mb", 1)
    for phase in _phases(args):
        if phase != "all":
            summary[f"{phase}_peak_rss_mb"] = median(
                f"{phase}_peak_rss_mb", 1)
        summary[f"{phase}_rss_stages_mb"] = {
            stage: round(statistics.median(
                r[f"{phase}_rss_stages_mb"][stage] for r in runs), 1)
            for stage in runs[0][f"{phase}_rss_stages_mb"]}
    summary["build_s"] = median("build_s", 2)
    for name in TIMED:
        summary[f"{name}_first_call_s"] = median(f"{name}_first_call_s", 2)
    summary["load_avg"] = [[round(v, 2) for v in r["load_avg"]]
                           for r in runs]
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    reference = REFERENCE.get(config_name)
    if reference:
        summary["ratio_to_reference"] = {
            key: round(summary[key] / value, 3)
            for key, value in reference.items()}
        summary["bound_ratio_to_reference"] = {
            f"{name}_s": round(summary[f"{name}_bound_s"]
                               / reference[f"{name}_s"], 3)
            for name in TIMED if f"{name}_s" in reference}
    return summary


def _print_table(summary: dict):
    ref = REFERENCE.get(summary["config"], {})
    print(f"{summary['config']} (batch {summary['batch_size']}, "
          f"{summary['params']:,} params, TF {summary['tf_version']}, "
          f"{summary['repeats']} repeats x {summary['steps']} steps)")
    for key in ("train_step_s", "eval_s", "sample_s", "peak_rss_mb"):
        line = f"  {key:14s} {summary[key]:>10}"
        if key in ref:
            line += f"   reference {ref[key]:>8}   ratio " \
                    f"{summary[key] / ref[key]:.2f}"
        name = key[:-len("_s")]
        if name in TIMED:
            line += f"   arithmetic floor {summary[name + '_bound_s']:.4f}"
        print(line)
    print(f"  ({summary['peak_gmacs_per_s']} G multiply-adds/s at most "
          f"on this machine; floor = the function's multiply-adds at it)")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the benchmark's flags on `flag_values` (absl's FLAGS)."""
    fv = dict(flag_values=flag_values)
    command_line.define_shared_flags(
        flag_values, ",".join(PUBLIC_PRESETS),
        "Preset (mnist-small, cifar-small) or trainer flagfile")
    flags.DEFINE_integer("steps", 20,
                         "Timed calls of each function per repeat.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first one "
                         "traces, so at least 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("repeats", 3, "Fresh processes per config.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("intra_op_threads", None,
                         "tf.config.threading intra-op threads (default: "
                         "TF's choice).", lower_bound=0, **fv)
    flags.DEFINE_integer("inter_op_threads", None,
                         "tf.config.threading inter-op threads.",
                         lower_bound=0, **fv)
    flags.DEFINE_integer(
        "inference_shards", 0,
        "Batch shards of eval and sample, timed in a second process with 1 "
        "intra-op thread and this many inter-op threads; 0: one per CPU "
        "core; 1: one process for everything, unsharded, with the thread "
        "flags above.", lower_bound=0, **fv)
    flags.DEFINE_bool("jit_compile", False,
                      "Compile the timed functions with XLA.", **fv)
    flags.DEFINE_enum("grappler", "lean", list(GRAPPLER),
                      "Grappler passes of the timed functions: 'lean' "
                      "(faster setup, same step time) or TensorFlow's "
                      "'default'.", **fv)
    flags.DEFINE_enum("remat", "none", list(REMAT_MODES),
                      "Recompute the training step's residual cells in its "
                      "backward pass (NVAE(remat=...)): less memory, more "
                      "time.", **fv)
    flags.DEFINE_enum("weights", "constant", ["constant", "variables"],
                      "Eval and sample read the weights as graph 'constant's "
                      "(as python -m nvae_tf.evaluate does: weight-only "
                      "tensors are folded once) or from 'variables' "
                      "(recomputed every call).", **fv)
    flags.DEFINE_integer("parallel_setup", 3,
                         "Repeats whose (untimed) build and compilation may "
                         "run at the same time; timed calls always run one "
                         "worker at a time.", lower_bound=1, **fv)
    flags.DEFINE_string("sync_dir", None, "Internal: the folder where a "
                        "worker waits for its turn to time.", **fv)
    flags.DEFINE_integer("index", 0, "Internal: the worker's number in "
                         "--sync_dir.", **fv)
    flags.DEFINE_enum("phase", "all", list(PHASES),
                      "Internal: what the worker times.", **fv)


@dataclasses.dataclass(frozen=True)
class Options:
    """The benchmark's flags (`define_flags`), read once by `from_flags`.

    `configs` are the `--config` names; `inference_shards` is resolved (0:
    one per CPU core).
    """

    configs: tuple[str, ...]
    batch_size: int | None
    steps: int
    warmup: int
    repeats: int
    intra_op_threads: int | None
    inter_op_threads: int | None
    inference_shards: int
    jit_compile: bool
    mixed_precision: str
    grappler: str
    remat: str
    weights: str
    parallel_setup: int
    json: bool
    worker: bool
    sync_dir: str | None
    index: int
    phase: str

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues) -> Options:
        return command_line.options(
            cls, flag_values,
            configs=command_line.config_names(flag_values.config),
            inference_shards=resolve_shards(flag_values.inference_shards))


def parse_args(argv=()) -> Options:
    """The options of a command line `argv` (without the program name); a
    bad value is one line on stderr and exit `nvae_tf.cli.EXIT_USER_ERROR`."""
    return command_line.parse(Options, define_flags, argv,
                              "benchmarks.bench")


def main(argv):
    """absl main: runs the benchmark with absl's FLAGS (`define_flags`)."""
    args = command_line.read(Options, argv)
    if args.worker:
        print(json.dumps(run_worker(args, args.configs[0])), flush=True)
        return
    for name in args.configs:
        summary = run_repeats(args, name)
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            _print_table(summary)


def cli(argv=None):
    """Entry point of `python -m benchmarks.bench`; `--memory` runs
    `python -m benchmarks.memory` with the other arguments."""
    argv = list(sys.argv if argv is None else argv)
    if "--memory" in argv[1:]:
        from benchmarks import memory
        argv.remove("--memory")
        memory.cli(argv)
        return
    command_line.run(main, define_flags, argv)


if __name__ == "__main__":
    cli()
