"""Unsupervised anomaly detection in brain MRI, as a napari plugin and a Qt-free library."""

__version__ = "0.1.0"
