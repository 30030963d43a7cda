"""Snapshot-aware predictive autoscaler for GPU inference on Kubernetes.

Data flow: signals (demand series) -> forecast (quantiles) -> plan (replicas, staging)
-> edges (simulator, controller, KEDA scaler, node agent).
"""

__version__ = "0.1.0"
