"""Foundation every stage imports: errors, atomic file writes, typed configuration, the metric."""
