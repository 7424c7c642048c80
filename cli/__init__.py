"""The `simfed` command line (typer): a thin layer over the Python API (simfed.launch, simfed.load_run)
and the sweep and partition tools. A command module imports what is heavy (torch, Ray) only when
its command runs, so `simfed --help` stays fast."""
