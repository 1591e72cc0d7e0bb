"""From the repository to Kaggle: kernel and dataset metadata, wheels, uploads, submissions."""
