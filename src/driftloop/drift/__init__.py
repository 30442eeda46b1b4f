"""Drift: alibi-detect detectors behind one interface, windows and the retraining policy."""
