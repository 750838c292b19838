"""Sub-commands of the `appliance` CLI; each module has `add_parser(subparsers)` and `run(args)`."""
