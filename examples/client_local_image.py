"""Ask the served model about a local image: the client sends it inline, as a base64 data URL.

    python client_local_image.py path/to/image.jpg [--base-url http://localhost:8000/v1] [--model my-qwen-VL]

The server never reads files from its own disk for a request (that would let clients read the server's
files); the image bytes travel in the request body (up to the server's body limit, 64 MiB by default).
"""

import argparse
import base64
import mimetypes
from pathlib import Path

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("image", type=Path)
parser.add_argument("--base-url", default="http://localhost:8000/v1")
parser.add_argument("--model", default="my-qwen-VL")
args = parser.parse_args()

mime = mimetypes.guess_type(args.image.name)[0] or "image/jpeg"
data_url = f"data:{mime};base64,{base64.b64encode(args.image.read_bytes()).decode()}"

client = OpenAI(base_url=args.base_url, api_key="placeholder")
response = client.chat.completions.create(
    model=args.model,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this image in two sentences."},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        }
    ],
    max_tokens=128,
)
print(response.choices[0].message.content)
print(f"({response.usage.prompt_tokens} prompt tokens, {response.usage.completion_tokens} generated)")
