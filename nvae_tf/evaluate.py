"""`python -m nvae_tf.evaluate`: likelihood, samples and reconstructions (code in `nvae_tf.serving.evaluate`)."""

from nvae_tf.serving.evaluate import cli

if __name__ == "__main__":
    cli()
