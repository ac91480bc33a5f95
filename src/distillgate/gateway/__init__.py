"""The policy gateway: an OpenAI-compatible proxy that enforces policy, quotas and audit on every teacher call.

    app.py        the ASGI app (request flow: parse → key → screens → route → admit → forward → contract →
                  settle → stamp)
    parse.py      request validation and identity extraction
    keys.py       hashed API keys (table gateway_api_keys)
    screens.py    pluggable prompt screens (credentials, extraction)
    contracts.py  output-contract checks
    stamps.py     provenance stamps (Ed25519 over canonical JSON)
    upstreams.py  model → upstream routing; HTTP and in-process teachers
    config.py     gateway.yaml model; server.py builds and serves it (uvicorn, uvloop, httptools)
    metrics.py    Prometheus metrics; openapi.py the /openapi.json document; errors.py OpenAI-shaped errors
"""
