"""Non-finite steps: skipped without side effects, then recovered from the
last checkpoint with a lower learning rate (test hook
`--debug_inject_nan_at_step`)."""

import numpy as np
import pytest

from tests.training import helpers as train_helpers

COUNTER = "{}/.ATTRIBUTES/VARIABLE_VALUE"


def _flags(tmp_path, name, *extra):
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    model_dir = str(tmp_path / name)
    return model_dir, (*train_helpers.TINY_FLAGS, f"--data_dir={data}",
                       f"--model_dir={model_dir}", "--export=false",
                       "--summary_every_steps=4", *extra)


@pytest.mark.slow
def test_nan_steps_are_skipped_then_recovered(tmp_path):
    model_dir, flags = _flags(
        tmp_path, "run", "--max_steps=12", "--checkpoint_every_steps=4",
        "--debug_inject_nan_at_step=5", "--nan_patience=3",
        "--nan_lr_factor=0.5")
    log = train_helpers.run_train(*flags).stderr
    assert ("NaN recovery 1: 3 consecutive non-finite steps up to step 8; "
            "restored") in log
    assert "(step 4) and multiplied the learning rate by 0.5" in log
    values = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(model_dir), prefix="")
    assert values[COUNTER.format("step")] == 12
    assert values[COUNTER.format("nan_recoveries")] == 1
    assert values[COUNTER.format("skipped_steps")] == 3
    assert values[COUNTER.format("nonfinite_streak")] == 0
    assert values[COUNTER.format("lr_scale")] == 0.5
    for name, value in values.items():
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name
    assert np.isfinite(train_helpers.final_nelbo(log))


@pytest.mark.slow
def test_a_skipped_step_changes_nothing_but_the_counters(tmp_path):
    # NaN from step 2 on, recovery far away: steps 2 and 3 are skipped.
    model_dir, flags = _flags(
        tmp_path, "run", "--max_steps=4", "--checkpoint_every_steps=2",
        "--debug_inject_nan_at_step=2", "--nan_patience=100")
    train_helpers.run_train(*flags)
    path = train_helpers.latest_checkpoint(model_dir)
    assert train_helpers.checkpoint_step(path) == 4
    at_2 = train_helpers.checkpoint_values(path.replace("ckpt-4", "ckpt-2"),
                                           prefix="")
    at_4 = train_helpers.checkpoint_values(path, prefix="")
    assert at_4[COUNTER.format("skipped_steps")] == 2
    assert at_4[COUNTER.format("nonfinite_streak")] == 2
    for name, value in at_2.items():
        if name.startswith(("model/", "optimizer/")):  # incl. BN statistics
            np.testing.assert_array_equal(at_4[name], value, err_msg=name)


@pytest.mark.slow
def test_too_many_recoveries_fail_with_a_clear_message(tmp_path):
    _, flags = _flags(
        tmp_path, "run", "--max_steps=8", "--checkpoint_every_steps=2",
        "--debug_inject_nan_at_step=3", "--nan_patience=2",
        "--max_nan_recoveries=0")
    proc = train_helpers.run_train(*flags, check=False)
    assert proc.returncode != 0
    assert "--max_nan_recoveries=0" in proc.stderr
