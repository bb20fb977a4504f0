"""nvae_tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow / Keras 3.

The public API, shown at work in docs/api.md:

    from nvae_tf import NVAE, NVAEConfig
    model = NVAE(NVAEConfig(dataset="mnist"))
    model, config = nvae_tf.convert.load_official_checkpoint("checkpoint.pt")

- `NVAEConfig`: the architecture, with the official flag names.
- `NVAE`: the model; calling it returns an `NVAEOutput`, `sample` an
  `NVAESample`.
- The image distributions of the decoder (`DiscretizedLogisticMixture`,
  `BernoulliImage`, `NormalImage`, built by `image_distribution`) and the
  latent Normal (`latent_normal`).
- `bits_per_dim`: nats per image to bits per dimension.
- `nvae_tf.convert.load_official_checkpoint`: official PyTorch checkpoints.

Everything but `NVAEConfig` is imported on first use, so that code needing
only the config (flag parsing, tuning) does not start TensorFlow.
"""

import importlib
from typing import TYPE_CHECKING

from nvae_tf.config import NVAEConfig

# Public name -> module that defines it.
_LAZY_EXPORTS = {
    "NVAE": "nvae_tf.model",
    "NVAEOutput": "nvae_tf.model",
    "NVAESample": "nvae_tf.model",
    "DiscretizedLogisticMixture": "nvae_tf.distributions",
    "BernoulliImage": "nvae_tf.distributions",
    "NormalImage": "nvae_tf.distributions",
    "image_distribution": "nvae_tf.distributions",
    "latent_normal": "nvae_tf.distributions",
    "bits_per_dim": "nvae_tf.objectives",
}
_LAZY_SUBMODULES = ("convert",)

__all__ = [
    "NVAE", "NVAEConfig", "NVAEOutput", "NVAESample",
    "DiscretizedLogisticMixture", "BernoulliImage", "NormalImage",
    "image_distribution", "latent_normal", "bits_per_dim", "convert",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from nvae_tf import convert
    from nvae_tf.distributions import (BernoulliImage,
                                       DiscretizedLogisticMixture,
                                       NormalImage, image_distribution,
                                       latent_normal)
    from nvae_tf.model import NVAE, NVAEOutput, NVAESample
    from nvae_tf.objectives import bits_per_dim


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
