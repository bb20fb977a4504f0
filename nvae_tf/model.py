"""The NVAE hierarchical VAE as a Keras model (Vahdat & Kautz, NeurIPS 2020).

Bottom-up encoder and top-down decoder share the latent hierarchy: for each
latent group k (coarse to fine) the decoder state gives the prior p_k, the
encoder feature of the same resolution combined with the decoder state gives
the posterior q_k, and a sample of q_k is merged back into the decoder. The
wiring (towers, samplers, combiners, the order of operations in `call`
and `sample`) follows the official `AutoEncoder` exactly.
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from nvae_tf import distributions
from nvae_tf import latents
from nvae_tf.layers.spectral import SpectralRegularizer
from nvae_tf.config import NVAEConfig
from nvae_tf.datasets import MNIST_PAD
from nvae_tf.layers.cells import ResidualCell
from nvae_tf.layers.combiners import DecoderCombinerCell, EncoderCombinerCell
from nvae_tf.layers.conv import WeightNormConv2D
from nvae_tf.layers.flows import PairedAutoregressiveFlow
from nvae_tf.layers.norm import BatchNorm
from nvae_tf.layers.remat import check_remat_mode, recompute
from nvae_tf.layers.tracking import CheckpointableCollections
from nvae_tf.training.fit import KerasTraining


class NVAEOutput(NamedTuple):
    """Result of `NVAE.__call__` (per image quantities are [B], in nats).

    Attributes:
      logits: decoder output [B, H, W, K], official channel order.
      kl_per_group: list of G tensors [B], top-down group order.
      log_q, log_p: summed log q(z|x) and log p(z) over all groups.
      recon_loss: -log p(x|z).
      nelbo: recon_loss + sum of kl_per_group (no warm-up, no balancing).
      groups: list of G `latents.LatentGroup` with per-group details.
    """

    logits: tf.Tensor
    kl_per_group: list
    log_q: tf.Tensor
    log_p: tf.Tensor
    recon_loss: tf.Tensor
    nelbo: tf.Tensor
    groups: list


class NVAESample(NamedTuple):
    """Result of `NVAE.sample`: images [N, H, W, C] in [0, 1], logits, z's."""

    images: tf.Tensor
    logits: tf.Tensor
    z: list


def _spectral_shape(conv):
    """Shape of `conv.spectral_matrix()` without computing it."""
    kh, kw, fan_in, _ = conv.kernel.shape
    if conv.depthwise:
        fan_in = 1
    return (conv.filters, kh * kw * fan_in)


def _static_batch_size(tensor):
    """The batch dimension as a Python int if known, else a scalar tensor."""
    size = tensor.shape[0]
    return int(size) if size is not None else tf.shape(tensor)[0]


@keras.saving.register_keras_serializable(package="nvae_tf")
class NVAE(CheckpointableCollections, KerasTraining, keras.Model):
    """NVAE built from an `NVAEConfig`.

    `compile` + `fit` train with the recipe of `python -m nvae_tf.train`,
    `evaluate` gives NELBO and bits/dim and `export` writes the serving
    SavedModel (`nvae_tf.training.fit`).

    Args:
      config: the architecture (`NVAEConfig` or its dict).
      seed: seed of the latent noise; the noise also depends on a step counter
        kept in a (checkpointed) variable and on the replica id.
      sync_batchnorm: batch statistics over all replicas, as the official
        SyncBatchNorm (a runtime choice, `RuntimeConfig.sync_batchnorm`).
      remat: what a training-mode call recomputes in the backward pass
        instead of keeping (`layers.remat.REMAT_MODES`): `"none"`,
        `"cells"` (each residual cell) or `"groups"` (the cells of each
        latent group as one segment). Same loss and gradients; less memory
        for more arithmetic.
    """

    def __init__(self, config, seed=0, sync_batchnorm=True, remat="none",
                 **kwargs):
        # Inputs are not autocast: pixel values k/255 must reach the
        # likelihood exactly, also under a mixed-precision policy.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = NVAEConfig.from_dict(config)
        if not isinstance(config, NVAEConfig):
            raise TypeError(f"config must be an NVAEConfig, got {config!r}.")
        self.config = config
        self.seed = int(seed)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.remat = check_remat_mode(remat)
        c = config
        sync = self.sync_batchnorm
        kw = dict(dtype=self.dtype_policy)

        def cell(cell_type, filters, name):
            return ResidualCell(cell_type, filters, c.arch_instance,
                                use_se=c.use_se, sync_batchnorm=sync,
                                name=name, **kw)

        def conv(filters, kernel_size, name):
            return WeightNormConv2D(filters, kernel_size,
                                    padding=(kernel_size - 1) // 2, name=name,
                                    **kw)

        enc_width = self._encoder_width
        dec_width = self._decoder_width
        latent2 = 2 * c.num_latent_per_group
        self.stem = conv(c.num_channels_enc, 3, "stem")
        self.preprocess = []
        for b in range(c.num_preprocess_blocks):
            for i in range(c.num_preprocess_cells):
                last = i == c.num_preprocess_cells - 1
                self.preprocess.append(cell(
                    "down_pre" if last else "normal_pre",
                    enc_width(b + 1 if last else b),
                    f"preprocess_{len(self.preprocess)}"))
        top = c.num_preprocess_blocks + c.num_latent_scales - 1
        self.encoder_cells, self.encoder_down_cells = [], []
        for scale in range(c.num_latent_scales):
            level = c.num_preprocess_blocks + scale
            for _ in range(c.groups_per_scale[scale] *
                           c.num_cell_per_cond_enc):
                self.encoder_cells.append(cell(
                    "normal_enc", enc_width(level),
                    f"encoder_cell_{len(self.encoder_cells)}"))
            if scale < c.num_latent_scales - 1:
                self.encoder_down_cells.append(cell(
                    "down_enc", enc_width(level + 1),
                    f"encoder_down_{scale}"))
        # Encoder combiners in encoder (bottom-up) order: the j-th serves
        # decoder group G - 1 - j; the last encoder group has none.
        self.encoder_combiners = [
            EncoderCombinerCell(name=f"encoder_combiner_{j}", **kw)
            for j in range(c.num_groups - 1)]
        self.enc0 = WeightNormConv2D(enc_width(top), 1, name="enc0", **kw)
        self.encoder_samplers, self.decoder_samplers, self.flows = [], [], []
        self.decoder_cells, self.decoder_combiners = [], []
        self.decoder_up_cells = []
        for k, level in enumerate(self._group_levels):
            self.encoder_samplers.append(conv(latent2, 3,
                                              f"encoder_sampler_{k}"))
            for n in range(c.num_nf):
                # Latents and their densities stay float32 under a mixed policy.
                self.flows.append(PairedAutoregressiveFlow(
                    name=f"flow_{k}_{n}", dtype="float32"))
            if k > 0:
                self.decoder_samplers.append(conv(latent2, 1,
                                                  f"decoder_sampler_{k}"))
                for _ in range(c.num_cell_per_cond_dec):
                    self.decoder_cells.append(cell(
                        "normal_dec", dec_width(level),
                        f"decoder_cell_{len(self.decoder_cells)}"))
            self.decoder_combiners.append(
                DecoderCombinerCell(name=f"decoder_combiner_{k}", **kw))
        for scale in range(c.num_latent_scales - 1):
            self.decoder_up_cells.append(cell(
                "up_dec", dec_width(top - scale - 1), f"decoder_up_{scale}"))
        self.postprocess = []
        for b in range(c.num_postprocess_blocks):
            level = c.num_postprocess_blocks - b
            for i in range(c.num_postprocess_cells):
                self.postprocess.append(cell(
                    "up_post" if i == 0 else "normal_post",
                    dec_width(level - 1),
                    f"postprocess_{len(self.postprocess)}"))
        self.image_head = conv(c.output_channels, 3, "image_head")

    # ----------------------------------------------------------- structure
    def _encoder_width(self, level):
        return self.config.num_channels_enc * self.config.level_mult(level)

    def _decoder_width(self, level):
        return self.config.num_channels_dec * self.config.level_mult(level)

    @property
    def _group_levels(self):
        """Resolution level (number of halvings) of each top-down group."""
        c = self.config
        levels = []
        for scale in reversed(range(c.num_latent_scales)):
            levels += [c.num_preprocess_blocks + scale] * c.groups_per_scale[
                scale]
        return levels

    def latent_shapes(self, batch_size=None):
        """[B, h, w, L] of every latent group, top-down."""
        c = self.config
        return [(batch_size, c.image_size_resolved // 2 ** level,
                 c.image_size_resolved // 2 ** level, c.num_latent_per_group)
                for level in self._group_levels]

    def build(self, input_shape=None):
        c = self.config
        size = c.image_size_resolved
        top = c.num_preprocess_blocks + c.num_latent_scales - 1

        def at(level, channels):
            side = size // 2 ** level
            return (None, side, side, channels)

        shape = (None, size, size, c.image_channels_resolved)
        self.stem.build(shape)
        shape = self.stem.compute_output_shape(shape)
        for cell in self.preprocess:
            cell.build(shape)
            shape = cell.compute_output_shape(shape)
        cells = iter(self.encoder_cells)
        encoder_shapes = []
        for scale in range(c.num_latent_scales):
            for _ in range(c.groups_per_scale[scale]):
                for _ in range(c.num_cell_per_cond_enc):
                    next(cells).build(shape)
                encoder_shapes.append(shape)
            if scale < c.num_latent_scales - 1:
                self.encoder_down_cells[scale].build(shape)
                shape = self.encoder_down_cells[scale].compute_output_shape(
                    shape)
        self.enc0.build(shape)
        self.prior_ftr0 = self.add_weight(
            shape=at(top, self._decoder_width(top))[1:], name="prior_ftr0",
            initializer=keras.initializers.RandomUniform(0.0, 1.0))
        latent = c.num_latent_per_group
        cells = iter(self.decoder_cells)
        for k, level in enumerate(self._group_levels):
            state = at(level, self._decoder_width(level))
            self.encoder_samplers[k].build(at(level,
                                              self._encoder_width(level)))
            for n in range(c.num_nf):
                self.flows[k * c.num_nf + n].build(at(level, latent))
            if k > 0:
                self.decoder_samplers[k - 1].build(state)
                for _ in range(c.num_cell_per_cond_dec):
                    next(cells).build(state)
                j = c.num_groups - 1 - k
                self.encoder_combiners[j].build(encoder_shapes[j], state)
            self.decoder_combiners[k].build(state, at(level, latent))
        for scale, up in enumerate(self.decoder_up_cells):
            up.build(at(top - scale, self._decoder_width(top - scale)))
        shape = at(c.num_preprocess_blocks,
                   self._decoder_width(c.num_preprocess_blocks))
        for cell in self.postprocess:
            cell.build(shape)
            shape = cell.compute_output_shape(shape)
        self.image_head.build(shape)
        self.spectral_regularizer = SpectralRegularizer(
            name="spectral_regularizer")
        self.spectral_regularizer.build(
            [_spectral_shape(conv) for conv in self.conv_layers()])
        self.noise_counter = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False,
            aggregation="only_first_replica", name="noise_counter")
        self.built = True

    def conv_layers(self):
        """Every convolution (weight-normalised or not, masked or not)."""
        return [layer for layer in self._flatten_layers(include_self=False)
                if isinstance(layer, WeightNormConv2D)]

    def batchnorm_layers(self):
        return [layer for layer in self._flatten_layers(include_self=False)
                if isinstance(layer, BatchNorm)]

    def num_parameters(self) -> int:
        """Trainable parameters: the count the official code reports (its
        `count_parameters_in_M` sums `named_parameters()`), without the BN
        moving statistics and power-iteration vectors that Keras'
        `count_params()` adds. Every nvae_tf report uses this count."""
        return sum(int(v.shape.num_elements())
                   for v in self.trainable_variables)

    def spectral_regularization(self, update_state=True):
        """Sum of the largest singular values of all effective conv kernels.

        Persistent power iteration (40 steps on first use, 4 afterwards);
        the state lives in `spectral_regularizer` and is checkpointed.
        """
        return self.spectral_regularizer(
            [conv.transposed_spectral_matrix() for conv in self.conv_layers()],
            update_state=update_state, transposed=True)

    # ---------------------------------------------------------------- noise
    def _draw_seed(self):
        """A fresh stateless seed per call, distinct across replicas."""
        count = tf.convert_to_tensor(self.noise_counter)
        self.noise_counter.assign_add(1)
        seed = tf.stack([tf.constant(self.seed, tf.int64), count])
        ctx = tf.distribute.get_replica_context()
        if ctx is not None:
            replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
            seed = tf.random.experimental.stateless_fold_in(seed, replica)
        return seed

    def latent_noise(self, batch_size, eps=None, seed=None):
        """Standard-normal noise of every latent group, top-down.

        Args:
          batch_size: B, a Python int or a scalar int tensor.
          eps: optional caller's noise, checked and returned as float32.
          seed: optional stateless seed [2]; without it (and without `eps`)
            the seed comes from the model's noise counter, which advances.

        Returns:
          A list of G tensors with the shapes `latent_shapes(B)`.
        """
        shapes = self.latent_shapes(batch_size)
        if eps is not None:
            if len(eps) != len(shapes):
                raise ValueError(f"eps has {len(eps)} tensors; the model has "
                                 f"{len(shapes)} latent groups with shapes "
                                 f"{shapes}.")
            return [tf.cast(e, tf.float32) for e in eps]
        if seed is None:
            seed = self._draw_seed()
        return [tf.random.stateless_normal(
            tf.stack([batch_size] + list(shape[1:])),
            seed=tf.random.experimental.stateless_fold_in(seed, k))
            for k, shape in enumerate(shapes)]

    # ---------------------------------------------------------------- input
    def _prepare_input(self, x):
        """Checks x [B, H, W, C] in [0, 1] and pads MNIST-like data to 32."""
        c = self.config
        if not x.dtype.is_floating:
            raise TypeError(f"NVAE expects float images in [0, 1], got dtype "
                            f"{x.dtype.name}; convert with x / 255.")
        sizes = {c.data_size, c.image_size_resolved}
        channels = c.image_channels_resolved
        if x.shape.rank != 4 or x.shape[1] not in sizes or \
                x.shape[2] != x.shape[1] or x.shape[3] != channels:
            raise ValueError(f"NVAE expects images of shape [B, {c.data_size},"
                             f" {c.data_size}, {channels}] for dataset "
                             f"{c.dataset!r}, got {list(x.shape)}.")
        x = tf.cast(x, tf.float32)
        if x.shape[1] != c.image_size_resolved:
            pad = [[0, 0], [MNIST_PAD, MNIST_PAD], [MNIST_PAD, MNIST_PAD],
                   [0, 0]]
            x = tf.pad(x, pad)
        return x

    def image_distribution(self, logits):
        """The output distribution p(x|z) for decoder `logits`."""
        c = self.config
        return distributions.image_distribution(
            tf.cast(logits, tf.float32), c.output_distribution,
            num_channels=c.image_channels_resolved,
            num_mixtures=c.num_mixture_dec, num_bits=c.num_x_bits)

    def _crop(self, images):
        if not self.config.pads_28_to_32:
            return images
        size = self.config.data_size
        return images[:, MNIST_PAD:MNIST_PAD + size,
                      MNIST_PAD:MNIST_PAD + size]

    # -------------------------------------------------------------- decoder
    def _decode(self, batch_size, next_latent, training):
        """Runs the top-down decoder; `next_latent(k, state)` returns z_k."""
        c = self.config
        state = tf.tile(tf.cast(self.prior_ftr0, self.compute_dtype)[None],
                        [batch_size, 1, 1, 1])
        cells = iter(self.decoder_cells)
        k = 0
        for scale, groups in enumerate(c.groups_per_decoder_scale):
            for _ in range(groups):
                if k > 0:
                    state = self._run_cells(
                        [next(cells) for _ in range(c.num_cell_per_cond_dec)],
                        state, training, latent_group=True)
                z = next_latent(k, state)
                state = self.decoder_combiners[k](state, z)
                k += 1
            if scale < c.num_latent_scales - 1:
                state = self._run_cells([self.decoder_up_cells[scale]], state,
                                        training)
        state = self._run_cells(self.postprocess, state, training)
        return tf.cast(self.image_head(tf.nn.elu(state)), tf.float32)

    def _run_cells(self, cells, state, training, latent_group=False):
        """`state` through residual `cells` in turn, recomputed per `remat`.

        In training with `remat="cells"` each cell is a recomputed segment;
        with `"groups"` the cells of a latent group (`latent_group`) form
        one segment and other cells are segments on their own.
        """
        if not training or self.remat == "none":
            for cell in cells:
                state = cell(state, training=training)
            return state
        segments = [cells] if latent_group and self.remat == "groups" \
            else [[cell] for cell in cells]
        for segment in segments:
            def run(s, segment=segment):
                for cell in segment:
                    s = cell(s, training=True)
                return s

            state = recompute(run)(state)
        return state

    def _prior_params(self, k, state, batch_size):
        if k == 0:
            shape = tf.stack([batch_size] + list(self.latent_shapes()[0][1:]))
            return latents.top_prior_params(shape)
        return latents.split_params(
            self.decoder_samplers[k - 1](tf.nn.elu(state)))

    # -------------------------------------------------------------- forward
    def _encode(self, x, training):
        """Bottom-up pass: the top feature and the remembered group features."""
        c = self.config
        s = self.stem(tf.cast(2.0 * x - 1.0, self.compute_dtype))
        s = self._run_cells(self.preprocess, s, training)
        cells = iter(self.encoder_cells)
        features = []
        for scale in range(c.num_latent_scales):
            for _ in range(c.groups_per_scale[scale]):
                s = self._run_cells(
                    [next(cells) for _ in range(c.num_cell_per_cond_enc)], s,
                    training, latent_group=True)
                features.append(s)
            if scale < c.num_latent_scales - 1:
                s = self._run_cells([self.encoder_down_cells[scale]], s,
                                    training)
        features.pop()  # the last group's feature goes through enc0 instead
        return tf.nn.elu(self.enc0(tf.nn.elu(s))), features

    def call(self, x, training=None, eps=None, seed=None):
        """Encodes x, decodes a posterior sample, and scores it.

        Args:
          x: float images [B, H, W, C] in [0, 1] (28x28 MNIST-like images are
            padded to 32 here).
          training: BN uses batch statistics (and updates its moving ones).
          eps: optional list of standard-normal tensors, one per latent group
            (top-down, shapes `latent_shapes(B)`), for a deterministic pass.
          seed: optional stateless seed [2] used when `eps` is None.

        Returns:
          `NVAEOutput`.
        """
        x = self._prepare_input(x)
        noise = self.latent_noise(_static_batch_size(x), eps, seed)
        c = self.config
        batch_size = tf.shape(x)[0]
        top_feature, features = self._encode(x, training)
        groups = []

        def posterior_latent(k, state):
            feature = top_feature if k == 0 else features[c.num_groups - 1 - k]
            z, group = self._posterior_latent(k, state, feature, noise,
                                              batch_size, training)
            groups.append(group)
            return z

        logits = self._decode(batch_size, posterior_latent, training)
        return self._output(x, logits, *groups)

    def _posterior_latent(self, k, state, feature, noise, batch_size,
                          training=False):
        """(z_k, its `latents.summarize_group`) for the batch.

        With `remat` in training each flow is recomputed like a residual
        cell: at 128x128 its expanded activations outweigh the cells'.
        """
        c = self.config
        if k > 0:
            feature = self.encoder_combiners[c.num_groups - 1 - k](
                feature, state)
        posterior, prior = latents.posterior_and_prior(
            self._prior_params(k, state, batch_size),
            latents.split_params(self.encoder_samplers[k](feature)),
            residual=c.res_dist and k > 0)
        z_sampled = latents.sample_normal(posterior, noise[k])
        z, log_det = z_sampled, 0.0
        for n in range(c.num_nf):
            flow = self.flows[k * c.num_nf + n]
            if training and self.remat != "none":
                flow = recompute(flow)
            z, step_log_det = flow(z)
            log_det = log_det + step_log_det
        return z, latents.summarize_group(posterior, prior, z_sampled, z,
                                          log_det, analytic_kl=c.num_nf == 0)

    def _output(self, x, logits, *groups):
        """The `NVAEOutput` of the batch from its logits and groups."""
        pixel_log_prob = self.image_distribution(logits).pixel_log_prob(x)
        recon_loss = -tf.reduce_sum(self._crop(pixel_log_prob), axis=(1, 2))
        kl_per_group = [g.kl for g in groups]
        return NVAEOutput(
            logits=logits, kl_per_group=kl_per_group,
            log_q=tf.add_n([g.log_q for g in groups]),
            log_p=tf.add_n([g.log_p for g in groups]),
            recon_loss=recon_loss,
            nelbo=recon_loss + tf.add_n(kl_per_group), groups=list(groups))

    def sample(self, num_samples, temperature=1.0, eps=None, seed=None,
               training=False, latents_given=None):
        """Draws images from the prior at a latent temperature.

        Args:
          num_samples: N, a Python int or scalar int tensor.
          temperature: multiplies every prior scale (after the +0.01).
          eps: optional per-group standard-normal noise (see `call`).
          seed: optional stateless seed [2] (for the latents and the image
            distribution), for exports and reproducible grids.
          training: BN in training mode (used to re-estimate statistics).
          latents_given: optional list of G tensors [N, h, w, L] or `None`s;
            a given z_k is used as is, the others are sampled from the prior
            (conditioned on the groups above).

        Returns:
          `NVAESample` with images [N, H, W, C] in [0, 1] (cropped to the data
          size), the decoder logits and the latents.
        """
        if isinstance(num_samples, int):
            batch_size = num_samples
        else:
            batch_size = tf.convert_to_tensor(num_samples, tf.int32)
        noise = self.latent_noise(batch_size, eps, seed)
        logits, zs = self.decode_prior(noise, temperature, training,
                                       latents_given)
        return NVAESample(images=self.images_from_logits(logits, seed),
                          logits=logits, z=zs)

    def decode_prior(self, noise, temperature=1.0, training=False,
                     latents_given=None):
        """Decoder logits and latents of `sample` for given noise.

        Args:
          noise: G standard-normal tensors [N, h, w, L] (`latent_noise`).
          temperature, training, latents_given: as for `sample`.

        Returns:
          (logits [N, H, W, K] float32, list of the G latents z_k).
        """
        groups = self.config.num_groups
        given = latents_given or [None] * groups
        if len(given) != groups:
            raise ValueError(f"latents_given has {len(given)} entries; the "
                             f"model has {groups} groups.")
        batch_size = tf.shape(noise[0])[0]
        zs = []

        def prior_latent(k, state):
            if given[k] is not None:
                zs.append(tf.cast(given[k], tf.float32))
                return zs[-1]
            raw_loc, raw_log_scale = self._prior_params(k, state, batch_size)
            prior = distributions.latent_normal(raw_loc, raw_log_scale,
                                                temperature)
            zs.append(latents.sample_normal(prior, noise[k]))
            return zs[-1]

        return self._decode(batch_size, prior_latent, training), zs

    def images_from_logits(self, logits, seed=None):
        """Images [N, H, W, C] in [0, 1] drawn from p(x|z) of decoder logits.

        Cropped to the data size. With `seed`, the draw uses a seed of its
        own derived from it (the latents of `sample` use the others).
        """
        image_seed = None if seed is None else \
            tf.random.experimental.stateless_fold_in(seed,
                                                     self.config.num_groups)
        images = self.image_distribution(logits).sample_with_temperature(
            1.0, seed=image_seed)
        return self._crop(images)

    def encode(self, x):
        """Posterior means of every latent group (eval-mode BN).

        Group k's mean is taken given the means of the groups above it (the
        noise is zero), then pushed through the flows, as the authors
        recommend for interpolation.

        Returns:
          (latents, scales): two lists of G tensors [B, h, w, L], top-down;
          `scales` are the posterior standard deviations.
        """
        x = self._prepare_input(tf.convert_to_tensor(x))
        zeros = [tf.zeros(tf.stack([tf.shape(x)[0]] + list(shape[1:])))
                 for shape in self.latent_shapes()]
        out = self(x, training=False, eps=zeros)
        return [g.z for g in out.groups], [g.post_scale for g in out.groups]

    def decode(self, latents_given, temperature=1.0, seed=None):
        """Images from given latents (see `sample(latents_given=...)`)."""
        first = next(z for z in latents_given if z is not None)
        return self.sample(tf.shape(first)[0], temperature, seed=seed,
                           latents_given=latents_given)

    def get_config(self):
        return {"config": self.config.to_dict(), "seed": self.seed,
                "sync_batchnorm": self.sync_batchnorm, "remat": self.remat,
                "name": self.name}
