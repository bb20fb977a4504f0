"""`python -m nvae_tf.train`: the official training recipe (code in `nvae_tf.training.main`)."""

from nvae_tf.training.main import cli

if __name__ == "__main__":
    cli()
