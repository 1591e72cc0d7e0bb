"""Command groups of `python -m kaggle_utils`; see kaggle_utils/cli.py."""
