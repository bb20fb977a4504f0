"""`python -m nvae_tf.convert`: official NVAE checkpoints to a model directory.

The code is in `nvae_tf.interop.convert`; `load_official_checkpoint` is
re-exported here as the public entry point.
"""

from nvae_tf.interop.convert import cli, load_official_checkpoint

__all__ = ["load_official_checkpoint"]

if __name__ == "__main__":
    cli()
