"""keras-tuner pieces: the NVAE HyperModel and a tuner running our trainer.

Every trial trains with `python -m nvae_tf.train` in a child process (the
same code path as a normal run: strategy, optimizer, schedules, NaN
recovery, checkpoints, TensorBoard), with the search's trainer flags plus the
trial's architecture, and is scored by the trainer's last evaluation of the
validation split. A trial never reads the test split
(`--nofinal_test_eval`), so the test figures of the chosen model are not
biased by the choice. Trials export nothing unless the search is given
`--export`; then they export under their own trial directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import keras_tuner as kt
from absl import logging

from nvae_tf.config import NVAEConfig
from nvae_tf.data import VALIDATION_SPLIT
from nvae_tf.training.log import EVAL_HISTORY_FILE, read_eval_history
from tuning import space as space_lib

TRIAL_INFO_FILE = "trial_info.json"
OUTPUT_TAIL_LINES = 40  # lines of a failed trainer's output to report


def objective_for(config: NVAEConfig) -> kt.Objective:
    """Validation bits/dim, or NELBO in nats for binary data (as NVAE)."""
    if config.is_binary:
        return kt.Objective("val_nelbo", direction="min")
    return kt.Objective("val_bpd", direction="min")


class NVAEHyperModel(kt.HyperModel):
    """Builds an `NVAE` from the base config with the searched fields."""

    def __init__(self, base_config: NVAEConfig, space: dict, **kwargs):
        super().__init__(**kwargs)
        space_lib.validate_space(space)
        self.base_config = base_config
        self.space = space

    def config(self, hp) -> NVAEConfig:
        return space_lib.sample_config(hp, self.space, self.base_config)

    def recipe(self, hp) -> dict:
        """The searched recipe flags' values (learning rate, ...)."""
        return space_lib.sample_recipe(hp, self.space)

    def training_flags(self, hp) -> list[str]:
        """The trial's searched architecture and recipe as trainer flags."""
        return space_lib.training_flags(self.config(hp), self.space,
                                        self.recipe(hp))

    def build(self, hp):
        from nvae_tf.model import NVAE  # noqa: E501 pylint: disable=import-outside-toplevel
        self.recipe(hp)  # registers the recipe's hyper-parameters too
        model = NVAE(self.config(hp))
        model.build()
        return model


class NVAETuner(kt.Tuner):
    """Runs each trial through the nvae_tf trainer in a child process.

    Args:
      oracle: a keras-tuner oracle (random, Bayesian, Hyperband).
      hypermodel: `NVAEHyperModel`.
      trainer_flags: the trainer flags of the search (every trial gets them).
      max_params: parameter budget; larger architectures are rejected
        before any training.
      **kwargs: `directory`, `project_name`, `overwrite` of `kt.Tuner`.
    """

    def __init__(self, oracle, hypermodel, trainer_flags, max_params=0,
                 **kwargs):
        super().__init__(oracle, hypermodel=hypermodel, **kwargs)
        searched = set(space_lib.searched_flags(hypermodel.space))
        # The trial's values replace the search's own values of those flags.
        self.trainer_flags = [
            line for line in trainer_flags
            if line.lstrip("-").split("=")[0].removeprefix("no")
            not in searched]
        self.max_params = max_params

    def trial_dir(self, trial_id) -> str:
        return os.path.join(self.project_dir, f"trial_{trial_id}")

    def trial_flags(self, trial) -> list[str]:
        hp = trial.hyperparameters
        extra = self.hypermodel.training_flags(hp)
        if "tuner/epochs" in hp.values:  # Hyperband's budget for this trial
            extra.append(f"--epochs={hp.values['tuner/epochs']}")
        # The test split stays unread; exports stay inside the search.
        extra.append("--nofinal_test_eval")
        if "--export" in self.trainer_flags:
            if not any(line.startswith("--export_dir_base=")
                       for line in self.trainer_flags):
                extra.append("--export_dir_base=" + os.path.join(
                    self.trial_dir(trial.trial_id), "saved_models"))
        else:
            extra.append("--noexport")
        return self.trainer_flags + extra

    def run_trial(self, trial, *args, **kwargs):
        start = time.time()
        params = self.hypermodel.build(trial.hyperparameters).num_parameters()
        info = {"trial_id": trial.trial_id, "params": params,
                "hyperparameters": dict(trial.hyperparameters.values)}
        model_dir = self.trial_dir(trial.trial_id)
        os.makedirs(model_dir, exist_ok=True)
        if self.max_params and params > self.max_params:
            self._write_info(model_dir, {**info, "status": "rejected",
                                         "seconds": 0.0})
            raise kt.errors.FailedTrialError(
                f"trial {trial.trial_id}: {params:,} parameters exceed "
                f"--max_params={self.max_params:,}; rejected without "
                "training.")
        flags = self.trial_flags(trial) + [f"--model_dir={model_dir}"]
        command = [sys.executable, "-m", "nvae_tf.train", *flags]
        logging.info("Trial %s: %s", trial.trial_id, " ".join(command[3:]))
        process = subprocess.run(command, capture_output=True, text=True,
                                 check=False)
        seconds = time.time() - start
        if process.returncode != 0:
            tail = "\n".join((process.stdout + process.stderr).splitlines()
                             [-OUTPUT_TAIL_LINES:])
            self._write_info(model_dir, {**info, "status": "failed",
                                         "seconds": seconds, "error": tail})
            raise kt.errors.FailedTrialError(
                f"trial {trial.trial_id}: the trainer exited with code "
                f"{process.returncode}:\n{tail}")
        result = read_validation_score(model_dir)
        metrics = {"val_nelbo": result["nelbo"], "val_bpd": result["bpd"]}
        self._write_info(model_dir, {**info, "status": "completed",
                                     "seconds": seconds, **metrics})
        return metrics

    @staticmethod
    def _write_info(model_dir, info):
        with open(os.path.join(model_dir, TRIAL_INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)

    def save_model(self, trial_id, model, step=0):
        """Trial checkpoints are the trainer's own (in the trial dir)."""

    def load_model(self, trial):
        from nvae_tf.training import checkpoints  # noqa: E501 pylint: disable=import-outside-toplevel
        return checkpoints.load_model_dir(self.trial_dir(trial.trial_id))


def read_validation_score(model_dir) -> dict:
    """The last validation-split evaluation the trainer recorded in
    `model_dir` (test-split records are ignored)."""
    validation = [r for r in read_eval_history(model_dir)
                  if r["split"] == VALIDATION_SPLIT]
    if not validation:
        raise kt.errors.FailedTrialError(
            f"{os.path.join(model_dir, EVAL_HISTORY_FILE)} holds no "
            "validation evaluation: the trainer finished without one (is "
            "--validation_fraction > 0?).")
    return max(validation, key=lambda r: r["step"])


def results_table(tuner: NVAETuner) -> list[dict]:
    """One row per trial: id, status, hyper-parameters, params, objective."""
    name = tuner.oracle.objective.name
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        path = os.path.join(tuner.trial_dir(trial_id), TRIAL_INFO_FILE)
        info = {}
        if os.path.exists(path):
            with open(path) as f:
                info = json.load(f)
        score = info.get(name)
        rows.append({
            "trial": trial_id, "status": info.get("status", trial.status),
            "objective": score, "params": info.get("params"),
            "seconds": round(info.get("seconds", 0.0), 1),
            **{k: v for k, v in trial.hyperparameters.values.items()
               if not k.startswith("tuner/")}})
    return rows
