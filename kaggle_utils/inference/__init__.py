"""Offline prediction: scheduling over devices, views, fallbacks, and the submission it writes."""
