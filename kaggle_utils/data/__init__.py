"""Competition files in, typed frames out: dialects, parsing and repairs, labels, folds, submissions."""
