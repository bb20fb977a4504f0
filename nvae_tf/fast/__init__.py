"""Opt-in speed measures applied at the model boundary (inference shards,
constant weights, Grappler presets); the model and its layers never import
them."""
