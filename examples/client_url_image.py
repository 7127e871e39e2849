"""Ask the served model about an image given by URL (the server fetches it), streaming the answer.

python client_url_image.py [--base-url http://localhost:8000/v1] [--model my-qwen-VL] [--url URL]
"""

import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default="http://localhost:8000/v1")
parser.add_argument("--model", default="my-qwen-VL")
parser.add_argument(
    "--url",
    default="https://upload.wikimedia.org/wikipedia/commons/thumb/d/dd/Gfp-wisconsin-madison-the-nature-boardwalk.jpg/2560px-Gfp-wisconsin-madison-the-nature-boardwalk.jpg",
)
args = parser.parse_args()

client = OpenAI(
    base_url=args.base_url, api_key="placeholder"
)  # any key, unless the server sets VLMSERVE_API_KEY
stream = client.chat.completions.create(
    model=args.model,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": args.url}},
            ],
        }
    ],
    max_tokens=256,
    temperature=0.2,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
