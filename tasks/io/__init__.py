"""Outside resources: the LanceDB store, object storage, the answers dataset, image bytes,
the Ray cluster, and the one atomic file writer."""
