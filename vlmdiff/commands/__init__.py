"""Sub-commands of the `vlmdiff` command line, one module each."""
