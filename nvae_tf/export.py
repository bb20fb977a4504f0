"""`python -m nvae_tf.export`: a SavedModel for TF Serving (code in `nvae_tf.serving.export`)."""

from nvae_tf.serving.export import cli

if __name__ == "__main__":
    cli()
