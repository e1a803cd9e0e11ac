"""saetune.rl (filled by later work)."""
