"""Serving exports with Triton Inference Server: `triton` runs one behind PyTriton (`flamingo-edge serve`),
`repository` writes a model repository for a Triton server you run (`flamingo-edge triton-repo`)."""
