"""saetune.analysis (filled by later work)."""
