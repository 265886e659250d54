"""SAKE's class masks rebuilt from WordNet 3.0, one JSON table per split folder (zsbir/data/wordnet_masks.py)."""
