"""Serve Qwen2.5-VL on Ray Serve with vlmserve: the Ray Serve LLM code, with `vlmserve` in the import.

    vlmserve run serve_qwen_VL:app --non-blocking     # starts a local Ray cluster, deploys, returns
    python client_url_image.py                        # or client_local_image.py, or ./curl_request.sh
    vlmserve status
    vlmserve shutdown -y                              # stops the app and the local cluster

Each replica runs one engine on one L40S; Ray Serve adds a second replica when the load calls for it
(autoscaling_config) and removes it when idle. HF_TOKEN (for gated models) reaches the replicas through
runtime_env. No GPU? Remove accelerator_type and set model_source="demo" (the small demo model shipped in
the package, no download) to try the same commands on a laptop's CPU.
"""

import os

from vlmserve import LLMConfig, build_openai_app

llm_config = LLMConfig(
    model_loading_config=dict(model_id="my-qwen-VL", model_source="Qwen/Qwen2.5-VL-7B-Instruct"),
    accelerator_type="L40S",
    deployment_config=dict(autoscaling_config=dict(min_replicas=1, max_replicas=2)),
    runtime_env=dict(env_vars={"HF_TOKEN": os.environ.get("HF_TOKEN")}),
    engine_kwargs=dict(max_model_len=8192, limit_mm_per_prompt={"image": 3}),
)

app = build_openai_app({"llm_configs": [llm_config]})
