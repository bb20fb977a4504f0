"""Makes layers and variables held in lists visible to tf.train.Checkpoint.

Keras 3 tracks `self.cells = [...]` in its own `TrackedList`, which its
TensorFlow backend hands to `tf.train.Checkpoint` only for SavedModel export,
not for checkpoints: a `tf.train.Checkpoint(model=model)` would silently skip
every layer in a list. Layers that keep sub-layers or variables in lists mix
this in, so checkpoints (and `CheckpointManager`) see all of them.
"""

import keras
import tensorflow as tf

_Trackable = tf.__internal__.tracking.Trackable
# Keras' TensorFlow backend lists in this private attribute the names of a
# layer's attributes that hold a TrackedList, TrackedDict or TrackedSet
# (keras/src/backend/tensorflow/layer.py and trackable.py).
KERAS_TRACKED_ATTRIBUTE = "_tracked"


def _tracked_attribute_names(layer):
    """The names Keras lists in `KERAS_TRACKED_ATTRIBUTE`; raises if absent.

    Without the list, the layers in lists would be missing from every
    checkpoint without an error; a Keras that renamed it must fail here.
    """
    try:
        return getattr(layer, KERAS_TRACKED_ATTRIBUTE)
    except AttributeError:
        raise RuntimeError(
            f"Keras {keras.__version__}: layer {layer.name!r} has no "
            f"`{KERAS_TRACKED_ATTRIBUTE}` attribute, which nvae_tf reads to "
            "put the layers held in lists into checkpoints; use the Keras "
            "version of requirements.txt or update "
            "nvae_tf/layers/tracking.py.") from None


class CheckpointableCollections:
    """Mixin for a Keras layer/model: lists and dicts become checkpoint edges."""

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type != "checkpoint":
            return children
        for attr in _tracked_attribute_names(self):
            value = getattr(self, attr, None)
            if isinstance(value, dict):
                items = [(str(k), v) for k, v in value.items()]
            elif isinstance(value, (list, tuple, set)):
                items = [(str(i), v) for i, v in enumerate(value)]
            else:
                continue
            for key, item in items:
                if isinstance(item, _Trackable):
                    children.setdefault(f"{attr}-{key}", item)
        return children
