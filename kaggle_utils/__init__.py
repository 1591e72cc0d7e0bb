"""kaggle_utils: a tested pipeline for Chatbot Arena preference prediction (LMSYS / WSDM formats)."""

__version__ = "0.1.0"
