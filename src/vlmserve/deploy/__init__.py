"""Ray Serve deployment of the same app and engine as `vlmserve serve`: replicas, routing, autoscaling.

    config.py   LLMConfig / LLMServingArgs / the Serve YAML file (Ray Serve LLM's field names), validated
    server.py   LLMServer: one replica = one ModelServer (engine, processor, media loader)
    ingress.py  OpenAiIngress: the FastAPI app of api/server.py, routing by model id to LLMServer handles
    builder.py  build_openai_app: LLMConfigs -> a Ray Serve Application (deployment options, autoscaling)
    cluster.py  `vlmserve run | status | shutdown`: start or join a local Ray cluster, deploy, stop

Everything here needs `ray[serve]`; nothing outside this package imports Ray.
"""
