"""The `simfed` command line (typer). Config files are parsed here and nowhere else."""
