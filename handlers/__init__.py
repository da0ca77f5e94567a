"""The model runtime: everything that wraps a model and knows its units.

Layer hooks, the attack library, model zoo, influence tracing, probes, bundle loading and the inference
backends live here. `training/` and `server/` both build on it; it imports neither.
"""
