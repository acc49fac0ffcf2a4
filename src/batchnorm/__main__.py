"""``python -m batchnorm``: an entry point only (the library never imports it); it runs the
demo's command line, :func:`batchnorm_demo.cli.entry`."""

if __name__ == "__main__":
    import sys

    from batchnorm_demo.cli import entry

    sys.exit(entry())
