"""Cloud tier: bigger models, and training them (reference CNNs, reduced-data learners)."""
