"""The transformer (device-agnostic), its model-parallel layers and collectives, CPU kernels and quantized products."""
