"""The `model.py` files of the Python-backend models that `flamingo-edge triton-repo` writes (serving/repository.py
copies them into REPO/<model>/1/model.py). They run inside Triton's Python backend stub, which provides
`triton_python_backend_utils`; nothing here imports them.

    flamingo.py     the generation model: Pipeline + Scheduler over the graph models, called through BLS
    onnx_graph.py   one graph run by ONNX Runtime (--python-only; needs numpy and onnxruntime only)
"""
