"""Serving: a Ray Serve application per model (Predictor ingress + DriftMonitor)."""
