"""The OpenAI-compatible server, on a real loopback port, through the official `openai` client."""

import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request

import jax
import openai
import pytest

from llm_jax.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from llm_jax.data.tokenizers import CharTokenizer
from llm_jax.inference import generate
from llm_jax.inference.api_schema import ChatMessage, ChatTemplate
from llm_jax.inference.server import ServerConfig, bind_socket, load_server, start_in_thread
from llm_jax.models import init_params
from llm_jax.training.checkpoint import save_model_checkpoint

TOKENIZER = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .,:\n"))
CFG = ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=64, init_std=0.5, dtype="float32")
MAX_CONCURRENT = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random model saved as a run directory and served on a free loopback port."""
    run_dir = tmp_path_factory.mktemp("serve") / "tiny"
    params = init_params(CFG, jax.random.key(0))
    config = ExperimentConfig(name="tiny", model=CFG, data=DataConfig(seq_len=64),
                              train=TrainConfig(run_dir=str(run_dir)))
    save_model_checkpoint(run_dir, config, params)
    TOKENIZER.save(run_dir / "tokenizer")
    app, engine = load_server(run_dir, engine_options=dict(max_batch=4, page_size=16, prefill_chunk=16, prefill_rows=2),
                              server_config=ServerConfig(model_name="tiny", max_body_bytes=4096, max_prompt_tokens=40,
                                                         max_tokens=48, max_concurrent=MAX_CONCURRENT))
    sock = bind_socket("127.0.0.1", 0)
    server = start_in_thread(app, sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield dict(url=url, client=client, params=params, engine=engine, loop=app.state.engine_loop)
    server.should_exit = True
    server.thread.join(timeout=10)


def _http(url: str, body: bytes | None = None, content_type: str = "application/json"):
    """(status, text) of a GET, or of a POST of raw bytes: what the openai client would never send."""
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _generate_text(served, prompt: str, max_tokens: int, seed: int, **sampling) -> str:
    out = generate(served["params"], CFG, [prompt], max_new_tokens=max_tokens, sampling=sampling, seed=seed,
                   stop_tokens=[TOKENIZER.eos_id], tokenizer=TOKENIZER)
    return out.texts[0]


def test_completions_match_generate_and_streaming_matches_non_streaming(served):
    client = served["client"]
    for seed, sampling in ((3, dict(temperature=0.9)), (0, dict(temperature=0.0))):
        expected = _generate_text(served, "the cat sat", 24, seed, **sampling)
        whole = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=24, seed=seed, **sampling)
        assert whole.choices[0].text == expected
        assert whole.usage.prompt_tokens == len("the cat sat")
        chunks = list(client.completions.create(model="tiny", prompt="the cat sat", max_tokens=24, seed=seed,
                                                stream=True, **sampling))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len(expected) > 3  # the model says something that could differ


def test_chat_uses_the_template_and_streams_the_same_text(served):
    client = served["client"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    prompt = ChatTemplate().render([ChatMessage(**m) for m in messages])
    assert prompt == "system: be brief\nuser: hello\nassistant:"
    expected = _generate_text(served, prompt, 12, 5, temperature=1.0)
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=5)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[0].choices[0].delta.role == "assistant"


@pytest.mark.parametrize("request_args, error, message", [
    (dict(model="gpt-4", prompt="x"), openai.NotFoundError, "model 'gpt-4' does not exist"),
    (dict(model="tiny", prompt="x" * 41), openai.BadRequestError, "41 tokens; the limit is 40"),
    (dict(model="tiny", prompt="x" * 30, max_tokens=40), openai.BadRequestError, "context of 64"),
    (dict(model="tiny", prompt="x", max_tokens=49), openai.BadRequestError, "limit of 48"),
    (dict(model="tiny", prompt="x", temperature=-1), openai.BadRequestError, "temperature: must be >= 0"),
    (dict(model="tiny", prompt="x", top_p=0), openai.BadRequestError, "top_p"),
    (dict(model="tiny", prompt="x", n=2), openai.BadRequestError, "n=2"),
    (dict(model="tiny", prompt="x", extra_body={"temprature": 1}), openai.UnprocessableEntityError, "temprature"),
    (dict(model="tiny", prompt="x", seed=2**63), openai.BadRequestError, "seed must be an integer that fits"),
    (dict(model="tiny", prompt="x", extra_body={"top_k": 2**31}), openai.BadRequestError, "top_k: must be in"),
])
def test_bad_requests_get_4xx_with_a_message(served, request_args, error, message):
    with pytest.raises(error, match=message):
        served["client"].completions.create(**request_args)


def test_malformed_and_oversized_bodies_then_the_server_keeps_serving(served):
    url = served["url"]
    status, text = _http(f"{url}/v1/completions", b"{not json")
    assert status == 400 and "not a JSON object" in json.loads(text)["error"]["message"]
    status, text = _http(f"{url}/v1/completions",
                         json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode())
    assert status == 422 and "max_tokens" in json.loads(text)["error"]["message"]
    status, text = _http(f"{url}/v1/completions", json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode())
    assert status == 413 and "4096 bytes" in json.loads(text)["error"]["message"]
    ok = served["client"].completions.create(model="tiny", prompt="ok", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert json.loads(_http(f"{url}/health")[1])["status"] == "ok"
    assert [m.id for m in served["client"].models.list()] == ["tiny"]


def test_a_burst_beyond_the_limit_gets_429_and_the_rest_complete(served):
    loop, client = served["loop"], served["client"]

    def ask(i):
        try:
            return client.completions.create(model="tiny", prompt=f"burst {i}", max_tokens=8, temperature=0)
        except openai.RateLimitError as e:
            return e

    loop.pause()  # requests queue up in the engine; none finishes until resume
    try:
        with concurrent.futures.ThreadPoolExecutor(MAX_CONCURRENT + 3) as pool:
            futures = [pool.submit(ask, i) for i in range(MAX_CONCURRENT + 3)]
            deadline = time.time() + 30
            while sum(f.done() for f in futures) < 3 and time.time() < deadline:
                time.sleep(0.05)
            loop.resume()
            results = [f.result() for f in futures]
    finally:
        loop.resume()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 3 and "limit 6" in str(refused[0])
    completed = [r for r in results if not isinstance(r, Exception)]
    assert len(completed) == MAX_CONCURRENT and all(r.choices[0].finish_reason for r in completed)


def test_a_client_that_disconnects_mid_stream_frees_its_pages(served):
    engine, loop = served["engine"], served["loop"]
    aborted = engine.stats["aborted"]
    loop.pause()  # the test steps the engine itself, so the request cannot finish on its own
    try:
        stream = served["client"].completions.create(model="tiny", prompt="a long story", max_tokens=48,
                                                     stream=True, extra_body={"ignore_eos": True})
        for _ in range(4):
            engine.step()
        assert engine.snapshot()["running"] == 1 and engine.pool.in_use() > 0
        assert next(iter(stream)).choices[0].text
        stream.close()
        deadline = time.time() + 20
        while engine.snapshot()["aborting"] == 0 and time.time() < deadline:
            time.sleep(0.05)  # the server notices the disconnect and aborts the request
    finally:
        loop.resume()
    while engine.stats["aborted"] == aborted and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats["aborted"] == aborted + 1
    assert engine.snapshot()["pages_in_use"] == 0 and engine.snapshot()["running"] == 0
    assert 'llm_jax_requests_total{finish_reason="abort"}' in _http(f"{served['url']}/metrics")[1]


def test_a_whole_answer_whose_client_left_stops_generating(served):
    """Without a stream the server has nothing to write until the end, so it asks whether
    the client is still there while the tokens come."""
    engine, loop = served["engine"], served["loop"]
    aborted = engine.stats["aborted"]
    body = json.dumps(dict(model="tiny", prompt="a long story", max_tokens=48, ignore_eos=True)).encode()
    host, port = served["url"].split("//")[1].split(":")
    loop.pause()  # the test steps the engine itself
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 20
            while not engine.has_work() and time.time() < deadline:
                time.sleep(0.02)
            for _ in range(3):
                engine.step()
        # The client is gone; the engine goes on stepping until the server notices.
        while engine.stats["aborted"] == aborted and engine.has_work() and time.time() < deadline:
            engine.step()
            time.sleep(0.05)
    finally:
        loop.resume()
    assert engine.stats["aborted"] == aborted + 1
    assert engine.snapshot()["pages_in_use"] == 0


def test_metrics_report_queue_running_throughput_and_time_to_first_token(served):
    served["client"].completions.create(model="tiny", prompt="metrics", max_tokens=4, temperature=0)
    text = _http(f"{served['url']}/metrics")[1]
    for name in ("llm_jax_requests_waiting", "llm_jax_requests_running", "llm_jax_generation_tokens_per_second",
                 "llm_jax_time_to_first_token_seconds_count", "llm_jax_generated_tokens_total"):
        assert name in text
    count = next(line for line in text.splitlines() if line.startswith("llm_jax_time_to_first_token_seconds_count"))
    assert float(count.split()[-1]) >= 1
    generated = next(line for line in text.splitlines() if line.startswith("llm_jax_generated_tokens_total"))
    assert float(generated.split()[-1]) == served["engine"].stats["generated_tokens"] >= 4
    assert _http(f"{served['url']}/v1/completions", b"x" * 5000)[0] == 413
    assert 'llm_jax_rejected_requests_total{status="413"}' in _http(f"{served['url']}/metrics")[1]
    # The rate covers the last `horizon` seconds: with nothing generated since, it falls to 0.
    loop = served["loop"]
    horizon, loop.horizon = loop.horizon, 0.2
    try:
        time.sleep(0.3)
        assert loop.tokens_per_second() == 0.0
    finally:
        loop.horizon = horizon


def test_a_request_without_max_tokens_gets_the_default_within_the_context_and_the_limit():
    from llm_jax.inference.server import ApiError, _max_tokens

    assert _max_tokens(None, 19, 256, context=64, limit=32) == 32  # the limit, not the 45 the context leaves
    assert _max_tokens(None, 19, 256, context=64, limit=48) == 45
    assert _max_tokens(None, 10, 16, context=64, limit=48) == 16
    assert _max_tokens(40, 10, 16, context=64, limit=32) == 40  # asked for: the caller checks it against the limit
    with pytest.raises(ApiError, match="max_tokens must be >= 1"):
        _max_tokens(0, 10, 16, context=64, limit=32)


def test_stop_strings_are_matched_in_the_text_and_held_back_while_streaming():
    from llm_jax.inference.server import _StopText

    # A stop string inside one piece (as inside one BPE token), across pieces, and none.
    assert _StopText(["e"]).feed("the", False) == ("th", True)
    stops = _StopText(["STOP"])
    assert [stops.feed(piece, False) for piece in ("abcST", "O", "Px")] == [("abc", False), ("", False), ("", True)]
    stops = _StopText(["STOP"])
    assert [stops.feed(piece, False) for piece in ("abcST", "Ax")] == [("abc", False), ("STAx", False)]
    assert stops.feed("yS", True) == ("yS", False)  # the last piece: nothing left to wait for


def test_a_chat_template_that_refuses_the_conversation_says_why():
    from llm_jax.inference.api_schema import ChatTemplateError

    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('start with a user turn') }}"
                            "{% endif %}{{ messages[0].content }}")
    assert template.render([ChatMessage(role="user", content="hi")]) == "hi"
    with pytest.raises(ChatTemplateError, match="start with a user turn"):
        template.render([ChatMessage(role="assistant", content="hi")])
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        ChatTemplate("{{ nothing.here }}").render([ChatMessage(role="user", content="hi")])


def test_serve_command_reports_a_missing_run_directory(tmp_path, capsys):
    from llm_jax import cli

    assert cli.main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "no checkpoints/ folder" in capsys.readouterr().err
