"""The harness: workloads, timing, FLOPs, result rows, the runner, reports, the gate and integrations.

It sees methods only through :class:`methods.AttentionMethod` and the registry.
"""
