"""Trust-boundary I/O: hostile JSON, safe reading of input folders, claimed outputs, secrets."""
