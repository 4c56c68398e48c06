"""An OpenAI-compatible HTTP server for models saved by ftnb, built on FastAPI and uvicorn: a client
written against it moves to vLLM on a GPU by changing one URL.

Usage:
    python -m ftnb serve path/to/generator legal=path/to/legal_adapter classifier=path/to/classifier
    from ftnb.serve import start_server            # the same command as a subprocess, for notebooks
    with start_server(["path/to/generator"]) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none")
        client.chat.completions.create(model="generator", messages=[{"role": "user", "content": "Hi"}])

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (stream=true for server-sent
events), POST /v1/classify ({"model", "input": a text, a list of texts, or records}).

What is served. Each argument is FOLDER or NAME=FOLDER (NAME defaults to the folder's name), a
folder saved by ftnb (ftnb_model.json). Generator adapters whose manifests name the same base,
loaded the same way, share ONE base model with each adapter attached under its own name, as
vLLM's `--lora-modules name=path` does; the bare base is served too, under the base's name. A
batch mixes adapters through peft's `adapter_names` (each row its own adapter). Merged
generators and classifiers are loaded on their own; a multi-head classifier folder NAME=FOLDER is served as one
classify model per head, `NAME/<label field>`. The request's `model` picks one; an unknown
name is a 404 that lists the served names, never a silent fallback to the base.

Decoding. A generator answers as `ftnb.saved.load(folder).generate(...)` does: with the system
prompt it was trained with when the request has none, and its saved decoding (greedy, its
repetition penalty on the answer's tokens); `temperature` > 0 samples instead.

Batching. Requests wait up to `batch_wait_ms` for others (at most `max_batch_size`); those for the
same model and decoding settings run as one left-padded `generate`, each row stopping at its own
max_tokens or stop string. A request arriving while a batch generates joins the next batch (vLLM
adds it to the running one: continuous batching). Model calls run in one worker thread, off the
event loop, so the server answers /health and rejects bad requests while the model works.

Exactness. Greedy answers over HTTP equal the in-process model's for the same prompt. Batching
pads prompts on the left and computes rows together: in fp32 that moves SmolLM2's next-token
logits by up to ~5e-5 against one prompt at a time (mixed adapters; tests/test_serve.py checks
< 1e-4), so a greedy token can only change where the top two logits are closer than that. For
answers that are exact by construction, serve with `--max-batch-size 1`.

Modules: models (what is served, loading), batching (queue, worker, generate), api (request
bodies, errors, routes, create_app), process (start_server).
"""
from ftnb.serve.api import create_app, serve
from ftnb.serve.models import load_models, parse_spec
from ftnb.serve.process import ServerProcess, start_server

__all__ = ["create_app", "serve", "load_models", "parse_spec", "ServerProcess", "start_server"]
