"""Scoring out-of-fold predictions: the CV report, calibration, blends, the ship decision."""
