"""Our own torch modules for LLaVA-1.5 (CLIP + projector + Llama) and checkpoint loading."""
