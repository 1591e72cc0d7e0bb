"""The demo: the whole pipeline on generated data, offline, and the README figures it records."""
