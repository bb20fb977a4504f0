"""Hyper-parameter search for nvae_tf on keras-tuner (imports nvae_tf only)."""
