"""Layers held in lists reach tf.train.Checkpoint, or saving fails loudly."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers import tracking


class _Tower(tracking.CheckpointableCollections, keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cells = [keras.layers.Dense(3, name=f"cell_{i}")
                      for i in range(2)]
        self.heads = {"mean": keras.layers.Dense(2, name="head")}

    def build(self, input_shape):
        for cell in self.cells:
            cell.build(input_shape)
        self.heads["mean"].build(input_shape[:-1] + (3,))


def _tower():
    tower = _Tower()
    tower.build((1, 3))
    return tower


def test_layers_in_lists_and_dicts_are_saved_and_restored(tmp_path):
    tower = _tower()
    assert set(tracking._tracked_attribute_names(tower)) >= {"cells", "heads"}
    path = tf.train.Checkpoint(tower=tower).save(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    for edge in ("cells-0", "cells-1", "heads-mean"):
        assert any(f"tower/{edge}/" in name for name in names), (edge, names)
    other = _tower()
    tf.train.Checkpoint(tower=other).restore(path).assert_consumed()
    for a, b in zip(tower.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_renamed_keras_attribute_fails_loudly(tmp_path):
    tower = _tower()
    # What a Keras that renamed the attribute would give the mixin.
    object.__delattr__(tower, tracking.KERAS_TRACKED_ATTRIBUTE)
    with pytest.raises(RuntimeError, match="has no `_tracked` attribute"):
        tf.train.Checkpoint(tower=tower).save(str(tmp_path / "ckpt"))
