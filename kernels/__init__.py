"""saetune.kernels (filled by later work)."""
