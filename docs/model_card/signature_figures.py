"""The model card's figures of the shipped SavedModel's `log_likelihood`
signature: mean NELBO of the first NUM_IMAGES Fashion-MNIST test images
(file order), which tests/test_shipped_model.py checks a fresh client gets.

    PYTHONPATH=. python docs/model_card/signature_figures.py SAVED_MODEL FIGURES_JSON
"""

import json
import sys

import numpy as np
import tensorflow as tf

from nvae_tf import data

NUM_IMAGES = 200
BATCH_SIZE = 100


def main(saved_model, figures_path):
    images = data.load_fashion_mnist()[1][:NUM_IMAGES]
    log_likelihood = tf.saved_model.load(saved_model).signatures[
        "log_likelihood"]
    outs = [log_likelihood(images=tf.constant(images[i:i + BATCH_SIZE]))
            for i in range(0, NUM_IMAGES, BATCH_SIZE)]
    figures = {}
    try:
        with open(figures_path) as f:
            figures = json.load(f)
    except FileNotFoundError:
        pass
    figures["log_likelihood_signature"] = {
        "images": "first 200 images of the Fashion-MNIST test file",
        "num_images": NUM_IMAGES, "batch_size": BATCH_SIZE,
        "nelbo_nats_mean": float(np.mean(np.concatenate(
            [o["nelbo_nats"].numpy() for o in outs]).astype(np.float64))),
        "bits_per_dim_mean": float(np.mean(np.concatenate(
            [o["bits_per_dim"].numpy() for o in outs]).astype(np.float64)))}
    with open(figures_path, "w") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
