"""Official NVAE checkpoints: the restricted reader of `torch.save` files
and the conversion into an nvae_tf model directory (no PyTorch needed)."""
