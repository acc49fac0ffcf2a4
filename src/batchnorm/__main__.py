"""``python -m batchnorm``: an entry point only (the library never imports it); it runs the
demo's command line, :func:`batchnorm_demo.cli.main`."""

if __name__ == "__main__":
    import sys

    from batchnorm_demo.cli import main

    sys.exit(main())
