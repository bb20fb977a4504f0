"""Architecture search for NVAE with keras-tuner.

    python -m tuning.search --flagfile=configs/quickstart.cfg \
        --tuner=random --max_trials=8 --directory=runs/tuning \
        --project_name=fashion --max_params=2000000 [--max_steps=2000 ...]

Every trainer flag given here (flagfile or command line) applies to every
trial; trials are scored on the validation split, `--validation_fraction`
of the training split (DEFAULT_VALIDATION_FRACTION when not given), and
never read the test split. The search space (tuning/space.py, or --search_space=space.json)
replaces the architecture fields. Rerunning the same command resumes the
search (keras-tuner keeps its oracle state in --directory). For a
distributed search start one chief and any number of workers with
keras-tuner's variables KERASTUNER_TUNER_ID (chief, tuner0, tuner1, ...),
KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT (BUILD.md).

Writes `<directory>/<project_name>/results.{csv,json}` and `best.cfg`, a
flagfile that `python -m nvae_tf.train --flagfile=...` accepts as is.
"""

from __future__ import annotations

import csv
import json
import os

import keras_tuner as kt
from absl import app, flags, logging

from nvae_tf import flagfiles
from nvae_tf.training import flags as nvae_flags
from tuning import space as space_lib
from tuning import tuner as tuner_lib

FLAGS = flags.FLAGS
TUNERS = ("random", "bayesian", "hyperband")
# Validation share of the training split when the search is not given one:
# trials must be scored on data that is neither trained on nor the test set.
DEFAULT_VALIDATION_FRACTION = 0.1
# Trainer flags that are per run, not part of a trial's configuration.
_PER_RUN_FLAGS = ("model_dir", "root", "save", "flagfile", "cont_training")

flags.DEFINE_enum("tuner", "random", TUNERS, "Search algorithm.")
flags.DEFINE_integer("max_trials", 10, "Trials (random and bayesian).")
flags.DEFINE_string("directory", "runs/tuning", "Where the search lives.")
flags.DEFINE_string("project_name", "nvae", "Sub-folder of --directory.")
flags.DEFINE_integer("max_params", 0, "Parameter budget (0: none); larger "
                     "architectures are rejected without training.")
flags.DEFINE_string("search_space", None, "JSON search space (default: "
                    "tuning/space.py DEFAULT_SPACE).")
flags.DEFINE_integer("hyperband_max_epochs", 9, "Hyperband: most epochs "
                     "of a trial.")
flags.DEFINE_integer("hyperband_factor", 3, "Hyperband: reduction factor.")
flags.DEFINE_integer("tuning_seed", 0, "Seed of the search algorithm.")
flags.DEFINE_integer("max_consecutive_failed_trials", 5,
                     "Stop with an error after this many failed trials in "
                     "a row (budget rejections count).")
flags.DEFINE_bool("overwrite", False, "Start the search anew instead of "
                  "resuming it.")


def trainer_flag_lines(flag_values) -> list[str]:
    """The trainer flags of this command that differ from their defaults."""
    probe = flags.FlagValues()
    nvae_flags.define_flags(probe)
    lines = []
    for name in sorted(probe):
        flag = flag_values[name]
        if name in _PER_RUN_FLAGS or name != flag.name:
            continue
        if flag.present or flag.value != flag.default:
            lines.append(flag.serialize())
    return [line for line in lines if line]


def make_oracle(objective, config_flags):
    common = dict(objective=objective, seed=config_flags.tuning_seed,
                  max_consecutive_failed_trials=(
                      config_flags.max_consecutive_failed_trials))
    if config_flags.tuner == "random":
        return kt.oracles.RandomSearchOracle(
            max_trials=config_flags.max_trials, **common)
    if config_flags.tuner == "bayesian":
        return kt.oracles.BayesianOptimizationOracle(
            max_trials=config_flags.max_trials, **common)
    return kt.oracles.HyperbandOracle(
        max_epochs=config_flags.hyperband_max_epochs,
        factor=config_flags.hyperband_factor, **common)


def write_results(tuner) -> dict:
    """Writes results.{csv,json} and best.cfg; returns the best row."""
    rows = tuner_lib.results_table(tuner)
    project_dir = tuner.project_dir
    with open(os.path.join(project_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    columns = sorted({k for row in rows for k in row},
                     key=lambda k: (k not in ("trial", "status", "objective",
                                              "params", "seconds"), k))
    with open(os.path.join(project_dir, "results.csv"), "w",
              newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        reasons = "; ".join(f"trial {r['trial']}: {r['status']}"
                            for r in rows)
        raise RuntimeError(f"No trial completed ({reasons}). See the "
                           f"trial_info.json files in {project_dir}.")
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = next(r for r in rows if r["trial"] == best_trial.trial_id)
    hp = best_trial.hyperparameters
    lines = ([f"# Best of {len(completed)} completed trials "
              f"(trial {best['trial']}, {tuner.oracle.objective.name} = "
              f"{best['objective']:.5f}, {best['params']:,} parameters)."]
             + tuner.trainer_flags + tuner.hypermodel.training_flags(hp) +
             [f"--model_dir={os.path.join(project_dir, 'best_run')}"])
    with open(os.path.join(project_dir, "best.cfg"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return best


def print_table(rows, objective_name):
    header = f"{'trial':>6} {'status':>10} {objective_name:>10} " \
             f"{'params':>10} {'seconds':>8}  hyper-parameters"
    print(header)
    for r in rows:
        score = "-" if r["objective"] is None else f"{r['objective']:.4f}"
        params = "-" if r["params"] is None else f"{r['params']:,}"
        hps = ", ".join(f"{k}={v}" for k, v in r.items() if k not in (
            "trial", "status", "objective", "params", "seconds"))
        print(f"{r['trial']:>6} {r['status']:>10} {score:>10} {params:>10} "
              f"{r['seconds']:>8}  {hps}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        base_config = nvae_flags.from_flags(FLAGS).model
        space = space_lib.load_space(FLAGS.search_space)
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    trainer_lines = trainer_flag_lines(FLAGS)
    if not FLAGS.validation_fraction:
        logging.info("Trials are scored on a validation split of "
                     "--validation_fraction=%g of the training split.",
                     DEFAULT_VALIDATION_FRACTION)
        trainer_lines.append(
            f"--validation_fraction={DEFAULT_VALIDATION_FRACTION}")
    tuner = tuner_lib.NVAETuner(
        make_oracle(tuner_lib.objective_for(base_config), FLAGS),
        tuner_lib.NVAEHyperModel(base_config, space),
        trainer_flags=trainer_lines, max_params=FLAGS.max_params,
        directory=FLAGS.directory, project_name=FLAGS.project_name,
        overwrite=FLAGS.overwrite)
    tuner.search()
    if os.environ.get("KERASTUNER_TUNER_ID", "chief") != "chief":
        logging.info("Worker %s done.", os.environ["KERASTUNER_TUNER_ID"])
        return
    best = write_results(tuner)
    print_table(tuner_lib.results_table(tuner), tuner.oracle.objective.name)
    print(f"Best trial {best['trial']}: {best['objective']:.5f}; flagfile "
          f"{os.path.join(tuner.project_dir, 'best.cfg')}")


def cli():
    """Entry point of `nvae-tune` and `python -m tuning.search`."""
    nvae_flags.define_flags()
    app.run(main, argv=flagfiles.command_line(
        __name__, help_groups=nvae_flags.HELP_GROUPS))


if __name__ == "__main__":
    cli()
