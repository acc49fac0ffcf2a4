"""``batchnorm inspect``: describe a saved layer (:mod:`.command`), through the library's
:func:`batchnorm.diagnostics.describe_checkpoint`."""
