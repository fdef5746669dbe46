"""Base models: loading any model and its tokenizer (loading), and SmolLM2's packaged GGUF converted once into
a local cache (gguf_cache). Nothing is downloaded at run time."""
