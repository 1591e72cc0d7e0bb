"""Helpers behind kaggle_utils/kaggle_cli.py: metadata, the local kernel check, wheels, the lazy Kaggle client.

Nothing here imports the `kaggle` package at import time (it authenticates when imported); only `client.py`
does, inside the function that needs it.
"""
