"""Subcommands beyond export (calibrate, build, bundle, doctor, generate, compare) register here."""
