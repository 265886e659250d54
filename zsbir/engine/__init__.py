"""The generic trainer and its pieces: checkpoints, seeding, run metadata, distributed helpers."""
