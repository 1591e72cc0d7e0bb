"""`python -m kaggle_utils`: one module per command group; commands call the package and hold no logic."""
