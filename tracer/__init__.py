"""vmitrace's tracer: the KVMI client, guest access, monitors, collector and CLI."""
