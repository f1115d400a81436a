"""Data: corpora (tfds builders), tokenizers, and the grain input pipeline."""
