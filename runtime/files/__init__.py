"""Files and the model store: gguf_file (our lazy GGUF reader), ggml_types, quantize, and
store (catalog, pull) with hub and download behind it."""
