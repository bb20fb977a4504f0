#!/usr/bin/env bash
# Rebuilds the model card's figures and images (docs/model_card.md) from
# the training run and the shipped SavedModel:
#   bash docs/model_card/make.sh [RUN_DIR]      (default runs/fashion_mnist)
# The IW NLL (K = 1000 on the 10,000 test images) takes hours on a CPU; it
# resumes where it stopped when run again.
set -euo pipefail
RUN=${1:-runs/fashion_mnist}
MODEL=saved_models/fashion_mnist/1
OUT=docs/model_card
SEED=1

python -m nvae_tf.serving.curve --model_dir="$RUN" \
    --output="$OUT/curve.png" --title="NVAE on Fashion-MNIST (validation split)"
for t in 1.0 0.7 0.5; do
  python -m nvae_tf.evaluate --model_dir="$RUN" --mode=sample --readjust_bn \
      --temperature=$t --num_samples=64 --seed=$SEED \
      --output="$OUT/samples_t$t.png"
done
python -m nvae_tf.evaluate --model_dir="$RUN" --mode=reconstruct \
    --num_images=32 --output="$OUT/reconstructions.png"
python -m nvae_tf.evaluate --model_dir="$RUN" --mode=interpolate \
    --num_pairs=4 --num_steps=8 --output="$OUT/interpolation.png"
python -m nvae_tf.evaluate --saved_model="$MODEL" --mode=nll --num_iw_samples=1 \
    --output="$OUT/test_nelbo.json"
python -m nvae_tf.evaluate --saved_model="$MODEL" --mode=nll \
    --num_iw_samples=1000 --output="$OUT/iw_nll.json"
PYTHONPATH=. python docs/model_card/signature_figures.py "$MODEL" "$OUT/figures.json"
