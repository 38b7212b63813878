"""Training: adapters of every method against a frozen base (``tessera train``), the demo
task suite and the built-in base model's pretraining. Imported as ``tessera.train``."""
