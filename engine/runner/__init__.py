"""The device side of a step: model loading, inputs, the forward pass, compile, CUDA graphs, tensor parallel."""
