"""saetune.app (filled by later work)."""
