#!/usr/bin/env bash
# One chat request with an image URL, with curl. BASE_URL and MODEL can be overridden:
#   BASE_URL=http://localhost:8000 MODEL=my-qwen-VL ./curl_request.sh
# Add "stream": true to the body to receive the tokens as server-sent events as they are generated.
set -euo pipefail
BASE_URL="${BASE_URL:-http://localhost:8000}"
MODEL="${MODEL:-my-qwen-VL}"

curl -sS "$BASE_URL/v1/chat/completions" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer placeholder" \
  -d @- <<JSON
{
  "model": "$MODEL",
  "messages": [{
    "role": "user",
    "content": [
      {"type": "text", "text": "What is in this image?"},
      {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/wikipedia/commons/thumb/d/dd/Gfp-wisconsin-madison-the-nature-boardwalk.jpg/2560px-Gfp-wisconsin-madison-the-nature-boardwalk.jpg"}}
    ]
  }],
  "max_tokens": 128
}
JSON
echo
