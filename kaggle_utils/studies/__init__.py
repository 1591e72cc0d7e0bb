"""Studies over many runs: one experiment's unit of work, the orderings comparison, QiD, report joins."""
