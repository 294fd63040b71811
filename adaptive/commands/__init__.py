"""CLI subcommands. Each module here defines ``register(subparsers)``; they are discovered
automatically, so a stage adds its command by adding a module."""
