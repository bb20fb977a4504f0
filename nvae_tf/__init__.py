"""nvae_tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow / Keras 3."""

from nvae_tf.config import NVAEConfig

__all__ = ["NVAEConfig"]
