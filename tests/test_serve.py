"""ftnb.serve: the real server (`python -m ftnb serve` in a subprocess on a free 127.0.0.1 port)
on saved SmolLM2 models: two generator adapters sharing one base, the base itself, a classifier.
Real HTTP through the `openai` client and raw requests: answers equal the in-process model's
greedy output (streamed or not, batched with padding and mixed adapters or not), every bad
request is a 4xx with an OpenAI-style error and the server keeps answering, a failing batch is a
500 for its requests only, and the server shuts down cleanly.

Worth its ~60 s (one model save, one server, in-process references; 12-token answers): it is
the only test of the HTTP layer, the batching and the adapter routing, end to end.
"""
import importlib.util
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from openai import OpenAI

from ftnb import saved
from ftnb.data import REPO_ROOT
from ftnb.inference import chat
from ftnb.serve import create_app, load_models, start_server
from ftnb.serve.api import ChatRequest, _decoding

MAX_TOKENS = 12
LIMIT = 64  # the server's --max-new-tokens-limit in these tests
PAIRS = [("Explain this clause in plain English.", "The tenant shall pay rent monthly."),
         ("Summarise the note.", "Patient reports mild headache, no fever, two days."),
         ("What does this error mean?", "502 Bad Gateway from the proxy."),
         ("Rewrite politely.", "Send me the invoice now.")]
TEXTS = ["I was charged twice for my order", "My parcel has not arrived after two weeks"]
RECORDS = [{"subject": "Cannot log in", "body": "The password reset link never arrives."}]


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", REPO_ROOT / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _content(pair: tuple[str, str]) -> str:
    """The user turn ftnb.tasks.sft.prompt_messages builds from an instruction and an input."""
    return f"{pair[0]}\n\n{pair[1]}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return _load_test_module().save_demo_models(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def base_name(demo) -> str:
    return saved.read_manifest(demo["legal"])["base_model"]["name"]


@pytest.fixture(scope="module")
def expected(demo, base_name):
    """What the in-process models answer, one prompt at a time (no padding): the adapters through
    ftnb.saved.load(...).generate, the bare base through its chat template alone."""
    answers = {}
    for name in ("legal", "medical"):
        generator = saved.load(demo[name])
        answers.update({(name, pair): generator.generate(*pair, max_new_tokens=MAX_TOKENS) for pair in PAIRS})
    base = saved.load_base(saved.read_manifest(demo["legal"]))
    answers.update({(base_name, pair): chat(base, generator.tokenizer, _content(pair), max_new_tokens=MAX_TOKENS)
                    for pair in PAIRS[:2]})
    answers["tickets"] = saved.load(demo["tickets"]).predict_proba(TEXTS + RECORDS)
    return answers


@pytest.fixture(scope="module")
def server(demo, expected):  # `expected` first: the in-process models run before the server competes for the CPU
    process = start_server([f"{name}={folder}" for name, folder in demo.items()], max_new_tokens_limit=LIMIT)
    yield process
    # uvicorn shuts down gracefully on SIGTERM, then ends by that signal
    assert process.stop() in (0, -signal.SIGTERM) and "Application shutdown complete" in process.log_tail()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url, api_key="none", max_retries=0)


def _ask(client, model: str, pair, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": _content(pair)}],
                                          **{"max_tokens": MAX_TOKENS, **kwargs})


def _http(root: str, path: str, body=None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (body None) or a POST of `body` (bytes are sent as they are)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(root + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_models_lists_adapters_their_base_and_the_classifier(client, base_name):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"legal", "medical", "tickets", base_name}
    assert models["legal"].parent == models["medical"].parent == base_name
    assert models["tickets"].kind == "classifier" and models[base_name].kind == "generator"


def test_greedy_answers_equal_the_in_process_models_and_differ_by_adapter(client, expected, base_name):
    for name in ("legal", "medical", base_name):
        answer = _ask(client, name, PAIRS[0])
        assert answer.choices[0].message.content.strip() == expected[(name, PAIRS[0])]
        assert answer.usage.completion_tokens <= MAX_TOKENS and answer.usage.prompt_tokens > 20
    # random nonzero LoRA B: each adapter is its own model, not the base in disguise
    assert len({expected[(name, PAIRS[0])] for name in ("legal", "medical", base_name)}) == 3


def test_streaming_sends_the_same_answer_piece_by_piece(client, expected):
    chunks = list(_ask(client, "medical", PAIRS[1], stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3
    assert "".join(pieces).strip() == expected[("medical", PAIRS[1])]
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens > 0


def test_each_row_of_a_batch_stops_at_its_own_max_tokens_and_stop_string(client, expected):
    full = expected[("legal", PAIRS[0])]
    stop = " ".join(full.split(" ")[3:5])  # two words, so several tokens: its first word must be held back
    cut = full[:full.index(stop)]
    with ThreadPoolExecutor(3) as pool:  # sent together, so they share a batch with another row's limits
        short, stopped, streamed = pool.map(lambda kw: _ask(client, "legal", PAIRS[0], **kw),
                                            [{"max_tokens": 3}, {"stop": [stop]}, {"stop": stop, "stream": True}])
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert full.startswith(short.choices[0].message.content.strip())
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content.strip() == cut.strip()
    # streamed: the stop string's start is held back until it is known not to complete the stop
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == cut.strip()


def test_sixteen_concurrent_requests_are_batched_and_answer_exactly(server, client, expected):
    requests = [(name, pair) for name in ("legal", "medical") for pair in PAIRS] * 2
    before = _http(server.root, "/health")[1]["batching"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: _ask(client, *r).choices[0].message.content.strip(), requests))
    after = _http(server.root, "/health")[1]["batching"]
    # left padding and mixed adapters in one generate leave the greedy answers unchanged here (fp32)
    assert answers == [expected[r] for r in requests]
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] <= 8  # not one by one
    assert after["largest_batch"] >= 4


def test_classify_texts_and_records_as_the_in_process_classifier(server, expected):
    status, body = _http(server.root, "/v1/classify", {"model": "tickets", "input": TEXTS + RECORDS})
    assert status == 200
    for got, want in zip(body["data"], expected["tickets"], strict=True):
        assert got["label"] == max(want, key=want.get)
        assert got["probabilities"] == pytest.approx(want, abs=1e-5)
    status, body = _http(server.root, "/v1/classify", {"model": "tickets", "input": TEXTS[0]})
    assert status == 200 and body["data"][0]["probabilities"] == pytest.approx(expected["tickets"][0], abs=1e-5)


HELLO = [{"role": "user", "content": "Hello"}]
BAD_REQUESTS = [  # (path, body, status, error code or param, a phrase the message must hold)
    ("/v1/chat/completions", {"model": "nope", "messages": HELLO}, 404, "model_not_found", "legal"),
    ("/v1/chat/completions", {"model": "tickets", "messages": HELLO}, 400, "wrong_route", "/v1/classify"),
    ("/v1/chat/completions", {"model": "legal", "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": "legal"}, 400, "messages", "required"),
    ("/v1/chat/completions", b'{"model": "legal", "messages": [', 400, "invalid_json", "not valid JSON"),
    ("/v1/chat/completions", {"model": "legal", "messages": "Hello"}, 400, "messages", "valid list"),
    ("/v1/chat/completions", {"model": "legal", "messages": [{"role": "robot", "content": "Hi"}]}, 400,
     "messages.0.role", "system"),
    ("/v1/chat/completions", {"model": "legal", "messages": HELLO, "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"model": "legal", "messages": HELLO, "max_tokens": LIMIT + 1}, 400,
     "max_tokens_too_large", f"at most {LIMIT}"),
    ("/v1/chat/completions", {"model": "legal", "messages": [{"role": "user", "content": "word " * 9000}]}, 400,
     "context_length_exceeded", "context is 8192 tokens"),
    ("/v1/chat/completions", {"model": "legal", "messages": HELLO, "tools": []}, 400, "tools", "unsupported parameter"),
    ("/v1/chat/completions", {"model": "legal", "messages": HELLO, "temperature": 5}, 400, "temperature", "2"),
    ("/v1/chat/completions", {"model": "legal", "messages": HELLO, "n": 2}, 400, "n", "1"),
    ("/v1/classify", {"model": "tickets", "input": []}, 400, "empty_input", "input is empty"),
    ("/v1/classify", {"model": "tickets", "input": "   "}, 400, "empty_input", "no text"),
    ("/v1/classify", {"model": "tickets", "input": [{"subject": "Hi"}]}, 400, "invalid_record", "'body'"),
    ("/v1/classify", {"model": "nope", "input": "Hi"}, 404, "model_not_found", "tickets"),
    ("/v1/classify", {"model": "legal", "input": "Hi"}, 400, "wrong_route", "/v1/chat/completions"),
    ("/v1/nothing", None, 404, "not_found", "/v1/nothing"),
]


@pytest.mark.parametrize("path, body, status, where, phrase", BAD_REQUESTS,
                         ids=[f"{p.split('/')[-1]}-{w}" for p, _, _, w, _ in BAD_REQUESTS])
def test_bad_requests_get_a_clear_openai_style_error(server, path, body, status, where, phrase):
    got, answer = _http(server.root, path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert where in (error["code"], error["param"]), error
    assert phrase in error["message"], error["message"]


def test_the_server_still_answers_after_the_bad_requests(server, client, expected):
    assert server.process.poll() is None
    assert _ask(client, "legal", PAIRS[0]).choices[0].message.content.strip() == expected[("legal", PAIRS[0])]


@contextmanager
def _in_process_server(app):
    import uvicorn

    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        while not runner.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{runner.servers[0].sockets[0].getsockname()[1]}"
    finally:
        runner.should_exit = True
        thread.join()


def test_a_failing_batch_is_a_500_for_its_requests_only(demo):
    app = create_app([f"legal={demo['legal']}", f"medical={demo['medical']}"])
    legal = app.state.service.served["legal"]
    layer = next(m for m in legal.engine.model.modules() if legal.adapter in getattr(m, "lora_A", {}))
    layer.lora_A[legal.adapter].weight = torch.nn.Parameter(torch.zeros(3, 7))  # a broken adapter: shapes clash
    with _in_process_server(app) as root:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        status, answer = _http(root, "/v1/chat/completions", {**body, "model": "legal"})
        assert status == 500 and answer["error"]["type"] == "server_error"
        assert "RuntimeError" in answer["error"]["message"]
        assert _http(root, "/v1/chat/completions", {**body, "model": "medical"})[0] == 200


@torch.no_grad()
def test_left_padding_and_mixed_adapters_move_logits_by_less_than_1e_4(demo, base_name):
    """What batching costs in exactness (fp32): the bound ftnb.serve's docstring states."""
    served = load_models([f"legal={demo['legal']}", f"medical={demo['medical']}"])
    rows = [(served[name], pair) for name in ("legal", "medical", base_name) for pair in PAIRS]
    ids = [model.prompt_ids([{"role": "user", "content": _content(pair)}]) for model, pair in rows]
    width, pad = max(map(len, ids)), served["legal"].engine.tokenizer.pad_token_id
    assert len(set(map(len, ids))) > 3  # prompts of several lengths: real padding
    lm = served["legal"].engine.model
    batched = lm(input_ids=torch.tensor([[pad] * (width - len(i)) + i for i in ids]),
                 attention_mask=torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
                 adapter_names=[model.adapter for model, _ in rows]).logits[:, -1]
    alone = torch.stack([lm(input_ids=torch.tensor([i]), adapter_names=[model.adapter]).logits[0, -1]
                         for i, (model, _) in zip(ids, rows)])
    assert (batched - alone).abs().max() < 1e-4  # a padding bug (mask, positions) moves them by whole units


def test_a_server_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="no folder"):
        start_server([str(tmp_path / "missing")], timeout_s=60)


def test_two_folders_with_one_name_are_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="served as 'adapter'"):
        load_models([str(tmp_path / "a" / "adapter"), str(tmp_path / "b" / "adapter")])


def test_requests_that_decode_alike_batch_together_and_tiny_temperatures_are_greedy():
    def settings(**fields):
        return _decoding({"repetition_penalty": 1.1, "max_new_tokens": 200},
                         ChatRequest(model="m", messages=HELLO, **fields))

    greedy = {"repetition_penalty": 1.1, "do_sample": False}
    assert settings() == settings(temperature=0) == settings(temperature=1e-40) == greedy
    assert settings(temperature=0.7, top_p=0.9) == {**greedy, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert settings(repetition_penalty=1.0, top_p=0.9) == {"repetition_penalty": 1.0, "do_sample": False}
