"""Reading a built cache: per-sequence examples and the Ray Dataset that streams them into training
(reader.py), and the decoding of schema-2 expert states (states.py). No teacher code."""
