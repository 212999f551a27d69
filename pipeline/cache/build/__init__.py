"""Building a cache: tokenise, run the teacher (teacher.py: the forward, its sparsified logits, aggregated
gates and states; augment.py: knowledge augmentation), fit the state basis and the held-out fidelity sample,
commit shards through the Ray Datasink, and the build itself with its resume (builder.py)."""
