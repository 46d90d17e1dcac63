"""Graph IR: capture, the fxfuse dialect, fake-value metadata, verification, numerics."""
