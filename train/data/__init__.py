"""Data for every stage: tokenizers, the embedded synthetic corpus, readers and packing of pretraining documents,
InternLM2's chat format, SFT items, preference pairs, and whole-item packing into micro-batches."""
