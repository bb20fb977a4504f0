"""Makes layers and variables held in lists visible to tf.train.Checkpoint.

Keras 3 tracks `self.cells = [...]` in its own `TrackedList`, which its
TensorFlow backend hands to `tf.train.Checkpoint` only for SavedModel export,
not for checkpoints: a `tf.train.Checkpoint(model=model)` would silently skip
every layer in a list. Layers that keep sub-layers or variables in lists mix
this in, so checkpoints (and `CheckpointManager`) see all of them.
"""

import tensorflow as tf

_Trackable = tf.__internal__.tracking.Trackable


class CheckpointableCollections:
    """Mixin for a Keras layer/model: lists and dicts become checkpoint edges."""

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type != "checkpoint":
            return children
        for attr in getattr(self, "_tracked", ()):
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
