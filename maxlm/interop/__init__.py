"""Using trained models: Hugging Face import/export (`hf`), KV-cache sampling (`sample`), evaluation (`evaluate`)."""
