"""Recomputation (`NVAE(remat=...)`): the same loss, gradients and batch-norm
statistics as without it, under tf.function, MirroredStrategy and mixed
precision."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf import objectives
from nvae_tf.layers import remat
from nvae_tf.model import NVAE
from tests.conftest import make_tiny_config, run_fresh_python

BATCH = 4
SUBPROCESS_TIMEOUT = 600
# float16 gradients: the backward pass sums the same float16 terms in
# another order with recomputation (a few float16 ulps, 2**-10 each).
FLOAT16_REL_TOL = 1e-2
REL_TOL = 1e-5
# Gradients that vanish analytically (biases of convolutions followed by
# batch norm: ~1e-9 of rounding) are compared at REL_TOL of this fraction
# of the model's largest gradient instead of their own.
VANISHING_FRACTION = 1e-3
# Two cells per latent group, so that "groups" segments hold several cells.
CONFIG = dict(num_nf=1, num_groups_per_scale=1, num_cell_per_cond_enc=2,
              num_cell_per_cond_dec=2)


def _models(modes, config=None, dtype=None):
    """Built models of the same weights, one per remat mode."""
    config = config or make_tiny_config(**CONFIG)
    kwargs = {} if dtype is None else {"dtype": dtype}
    models = [NVAE(config, seed=3, remat=mode, **kwargs) for mode in modes]
    for model in models:
        model.build()
    for model in models[1:]:
        model.set_weights(models[0].get_weights())
    return models


def _batch(model, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (BATCH, 8, 8, 3)) / 255.0
    eps = [tf.constant(rng.normal(size=(BATCH,) + s[1:]), tf.float32)
           for s in model.latent_shapes()]
    return tf.constant(x, tf.float32), eps


def _loss_and_grads(model, x, eps):
    objective = objectives.ObjectiveConfig(total_steps=100,
                                           weight_decay_norm=1e-2)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = objectives.compute_loss(model, x, tf.constant(5), objective,
                                           eps=eps).loss
        return loss, tape.gradient(loss, model.trainable_variables)

    return step()


def _relative_error(got, want, floor=1e-30):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) /
                 max(float(np.max(np.abs(want))), floor))


def _assert_gradients_close(got, want, variables, rel_tol):
    assert len(got) == len(want) == len(variables) > 100
    floor = VANISHING_FRACTION * max(float(np.max(np.abs(g))) for g in want)
    for g, w, v in zip(got, want, variables):
        assert g is not None, v.path
        assert _relative_error(g, w, floor) <= rel_tol, v.path


@pytest.mark.slow
def test_loss_gradients_and_moving_statistics_equal_without_remat():
    plain, *recomputed = _models(["none", "cells", "groups"])
    x, eps = _batch(plain)
    loss, grads = _loss_and_grads(plain, x, eps)
    for model in recomputed:
        remat_loss, remat_grads = _loss_and_grads(model, x, eps)
        assert _relative_error(remat_loss, loss) <= REL_TOL, model.remat
        _assert_gradients_close(remat_grads, grads, plain.trainable_variables,
                                REL_TOL)
        # The moving statistics moved once: the step's recomputed forward
        # (in the backward pass) did not update them a second time.
        moved = 0
        for bn, remat_bn in zip(plain.batchnorm_layers(),
                                model.batchnorm_layers()):
            for a, b in ((bn.moving_mean, remat_bn.moving_mean),
                         (bn.moving_variance, remat_bn.moving_variance)):
                np.testing.assert_allclose(b.numpy(), a.numpy(),
                                           rtol=REL_TOL, atol=1e-7,
                                           err_msg=a.path)
                moved += int(not np.allclose(a.numpy(), 0.0) and
                             not np.allclose(a.numpy(), 1.0))
        assert moved > 20, model.remat


def test_recompute_runs_the_forward_again_in_the_backward_pass():
    calls = []

    def double(x):
        calls.append(remat.recomputing())
        return 2.0 * x

    x = tf.constant([1.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = remat.recompute(double)(x)
    assert calls == [False]
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [2.0, 2.0])
    assert calls == [False, True]
    assert not remat.recomputing()


@pytest.mark.slow
def test_mixed_precision_matches_without_remat():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        plain, recomputed = _models(["none", "cells"])
        x, eps = _batch(plain)
        loss, grads = _loss_and_grads(plain, x, eps)
        remat_loss, remat_grads = _loss_and_grads(recomputed, x, eps)
    finally:
        keras.config.set_dtype_policy("float32")
    assert recomputed.compute_dtype == "float16"
    assert np.isfinite(loss.numpy())
    # float16 activations, recomputed by the same kernels: the same loss.
    assert _relative_error(remat_loss, loss) <= REL_TOL
    _assert_gradients_close(remat_grads, grads, plain.trainable_variables,
                            FLOAT16_REL_TOL)


def test_invalid_mode_is_one_clear_error():
    with pytest.raises(ValueError, match="remat='all' is invalid"):
        NVAE(make_tiny_config(), remat="all")
    model = NVAE(make_tiny_config(), remat="groups")
    assert model.get_config()["remat"] == "groups"


_MIRRORED_SCRIPT = r"""
import json, os
VANISHING_FRACTION = %r
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from nvae_tf.model import NVAE
from tests.conftest import make_tiny_config

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
config = make_tiny_config(num_groups_per_scale=1)
rng = np.random.default_rng(0)
x = tf.constant(rng.integers(0, 256, (4, 8, 8, 3)) / 255.0, tf.float32)
results = {}
with strategy.scope():
    models = {mode: NVAE(config, seed=3, sync_batchnorm=True, remat=mode)
              for mode in ("none", "cells")}
    for model in models.values():
        model.build()
    models["cells"].set_weights(models["none"].get_weights())
eps = [tf.constant(rng.normal(size=(4,) + s[1:]), tf.float32)
       for s in models["none"].latent_shapes()]
dataset = tf.data.Dataset.from_tensor_slices((x, *eps)).batch(4)
batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
for mode, model in models.items():
    @tf.function
    def step(x, *eps):
        def replica(x, *eps):
            with tf.GradientTape() as tape:
                out = model(x, training=True, eps=list(eps))
                loss = tf.reduce_sum(out.nelbo) / 4.0
            grads = tape.gradient(loss, model.trainable_variables)
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce("sum", [loss] + grads)
        return strategy.run(replica, args=(x, *eps))
    values = step(*batch)
    local = [strategy.experimental_local_results(v)[0].numpy()
             for v in values]
    moving = [bn.moving_variance.numpy() for bn in model.batchnorm_layers()]
    results[mode] = [local, moving]
ref, got = results["none"], results["cells"]
floor = VANISHING_FRACTION * max(np.max(np.abs(g)) for g in ref[0][1:])
def rel(a, b, floor=1e-30):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))
print(json.dumps({
    "loss": rel(got[0][0], ref[0][0]),
    "grads": max(rel(a, b, floor) for a, b in zip(got[0][1:], ref[0][1:])),
    "moving": max(rel(a, b) for a, b in zip(got[1], ref[1])),
    "moved": sum(int(not np.allclose(m, 1.0)) for m in ref[1])}))
"""


@pytest.mark.slow
def test_mirrored_strategy_two_replicas_match_without_remat():
    result = json.loads(run_fresh_python(
        _MIRRORED_SCRIPT % VANISHING_FRACTION,
        timeout=SUBPROCESS_TIMEOUT).splitlines()[-1])
    assert result["loss"] <= REL_TOL
    assert result["grads"] <= REL_TOL
    assert result["moving"] <= REL_TOL
    assert result["moved"] > 10
