"""Report stage: self-contained HTML per query run and an overview of the database."""
