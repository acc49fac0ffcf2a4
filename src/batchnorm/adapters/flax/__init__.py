"""The Flax adapter: ``BatchNorm`` and ``BatchRenorm`` for ``flax.linen`` and ``flax.nnx``,
thin over :mod:`batchnorm.jax`. Public as :mod:`batchnorm.flax.linen` and
:mod:`batchnorm.flax.nnx`; imports Flax (install the ``[flax]`` extra)."""
