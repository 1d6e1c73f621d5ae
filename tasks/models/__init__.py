"""Models: open_clip loading (real weights or the tiny local checkpoint) and the VLM
engines behind one interface."""
