"""Keras 3 layers of NVAE: weight-normalised convolutions, batch norm, the
residual cells and their blocks, combiners, flows, the spectral regulariser
and recomputation."""
