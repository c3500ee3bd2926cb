"""Developer tooling: the ComfyUI runtime, tiny seeded models, a headless server, workflow conversion.

Not part of the node pack: used by tests, benchmarks and the demo job.
"""
