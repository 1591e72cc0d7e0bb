"""The preference classifier on any backbone, real checkpoints, devices and dtypes."""
