"""Mixed precision (float16 with a dynamic loss scale, bfloat16) and XLA
train the tiny model to a finite result."""

import numpy as np
import pytest

from tests.training import helpers as train_helpers


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ("--mixed_precision=float16",), ("--mixed_precision=bfloat16",),
    ("--jit_compile", "--strategy=one_device")], ids=lambda e: e[0][2:])
def test_precision_and_xla_options_train(tmp_path, extra):
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    model_dir = str(tmp_path / "run")
    log = train_helpers.run_train(
        *train_helpers.TINY_FLAGS, f"--data_dir={data}",
        f"--model_dir={model_dir}", "--max_steps=3", "--export=false",
        *extra).stderr
    assert np.isfinite(train_helpers.final_nelbo(log))
    values = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(model_dir), prefix="")
    assert values["skipped_steps/.ATTRIBUTES/VARIABLE_VALUE"] == 0
    float16 = extra == ("--mixed_precision=float16",)
    # The official GradScaler's initial scale, grown after 2000 good steps.
    assert values["loss_scale/.ATTRIBUTES/VARIABLE_VALUE"] == (
        2.0 ** 10 if float16 else 1.0)
