"""Text conditions: the sentence encoder (encoder.py), captions made from a dataset
(captions.py) and the caption table with prompts turned into embeddings (embedding.py).
Import from the modules; this file imports nothing, so that presets can read the encoder table
below the rest."""
