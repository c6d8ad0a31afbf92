"""Model execution: config (hyperparameters from GGUF), weights (packed per layer), placement
(which device runs each layer), backend (the kernel packages behind one interface),
model_runner (ForwardBatch to logits) and models/ (one file per architecture)."""
