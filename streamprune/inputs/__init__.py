"""What a run reads besides the model: calibration and evaluation text, and the embedded
demo model (SmolLM2-135M-Instruct, converted once from its GGUF)."""
