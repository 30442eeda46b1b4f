"""driftloop: sweep, register, serve with drift detectors, retrain on drift, hot-swap — on Ray."""

__version__ = "0.1.0"
