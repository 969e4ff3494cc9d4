"""maxlm: JAX-native LLM pre-training."""
