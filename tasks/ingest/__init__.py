"""Ingest stage: list a dump, read its metadata, plan against the ledger, decode and
CLIP-embed on Ray, commit to LanceDB; backfills of many dumps through one pipeline."""
