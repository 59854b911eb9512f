"""Golden VMs: one backend interface (``base``), shared lifecycle, and the backends."""
