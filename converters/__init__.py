"""Pure tensor math for converting LoRA adapters to shared forms (no file or model I/O)."""
