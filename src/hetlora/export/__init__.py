"""What a run hands to a device runtime: a merged model (merged) and per-tier GGUF LoRA adapters for
llama.cpp (gguf)."""
