"""Caption images with a `flamingo-edge serve` server over gRPC, or stream the text as it is generated.

    flamingo-edge serve EXPORT                                  # in the serving venv (docs/serving.md)
    python samples/triton_client.py photo.jpg street.png        # every image at once; the server batches them
    python samples/triton_client.py --stream photo.jpg          # the caption token by token (flamingo_stream)
    python samples/triton_client.py --prompt "<image>Q: how many cars? A:" photo.jpg

Needs only tritonclient[grpc] and numpy: images go as the bytes of their files, and the server decodes them.
"""

import argparse
import queue

import numpy as np
import tritonclient.grpc as grpcclient

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG); one request per image")
parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address (default: 127.0.0.1:8001)")
parser.add_argument("--prompt", default="<image>caption:",
                    help="the prompt; '<image>' is where the image goes (default: '<image>caption:', the demo "
                         "model's caption prompt)")
parser.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per caption (default: 32)")
parser.add_argument("--stream", action="store_true", help="print each caption as it is generated, one at a time")
args = parser.parse_args()


def request_inputs(image_path: str) -> list:
    """The inputs of one request: the prompt, the image file's bytes, max_new_tokens."""
    with open(image_path, "rb") as file:
        encoded = file.read()
    values = {"prompt": ("BYTES", np.array([args.prompt.encode("utf-8")], dtype=object)),
              "image": ("BYTES", np.array([encoded], dtype=object)),
              "max_new_tokens": ("INT32", np.array([args.max_new_tokens], np.int32))}
    inputs = []
    for name, (datatype, value) in values.items():
        inputs.append(grpcclient.InferInput(name, list(value.shape), datatype))
        inputs[-1].set_data_from_numpy(value)
    return inputs


client = grpcclient.InferenceServerClient(args.url)

# 1. `flamingo`: send every request at once (async_infer); the server decodes them together, in flight.
if not args.stream:
    answers = queue.Queue()
    for index, path in enumerate(args.images):
        client.async_infer("flamingo", request_inputs(path),
                           callback=lambda result, error, index=index: answers.put((index, result, error)))
    captions = {}
    for _ in args.images:
        index, result, error = answers.get()
        captions[index] = f"error: {error.message()}" if error else result.as_numpy("text")[0].decode()
    for index, path in enumerate(args.images):
        print(f"{path}: {captions[index]}")

# 2. `flamingo_stream` (gRPC only): one response per token, then Triton's empty final response.
else:
    pieces = queue.Queue()
    client.start_stream(callback=lambda result, error: pieces.put((result, error)))
    for path in args.images:
        client.async_stream_infer("flamingo_stream", request_inputs(path), enable_empty_final_response=True)
        print(f"{path}: ", end="", flush=True)
        while True:
            result, error = pieces.get()
            if error:
                print(f"error: {error.message()}", end="")
                break
            response = result.get_response()
            if response.outputs:
                print(result.as_numpy("text")[0].decode(), end="", flush=True)
            if response.parameters["triton_final_response"].bool_param:
                break
        print()
    client.stop_stream()
client.close()
