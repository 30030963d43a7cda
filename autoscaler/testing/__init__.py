"""Test support that runs real things (pod sandboxes made of Linux namespaces), shared by the
agent's tests and the Kubernetes end-to-end tests. Not imported by the product code."""
