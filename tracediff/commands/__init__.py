"""One module per CLI subcommand; see :mod:`tracediff.cli`."""
