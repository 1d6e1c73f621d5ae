"""Adapt stage: instruction-data export from the tables and answers, collation, and LoRA
fine-tuning."""
