"""agent-vm: a promotion control plane for a golden VM hosting AI agents as untrusted workloads."""

__version__ = "0.1.0"
