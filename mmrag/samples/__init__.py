"""Sample data: photo-like Place-Pulse-style dumps and demo queries files (not a pipeline stage)."""
