"""``lmport launch``: TGI's flags and environment variables, the sharding refusal, and a real
launch of a tiny checkpoint in a subprocess that serves, then exits 0 on SIGTERM after
finishing its in-flight request."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lmport.commands import launch
from lmport.commands.launch_flags import FlagError, resolve_settings


def parse(argv: list[str], environ: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    launch.add_parser(sub)
    args = parser.parse_args(["launch", *argv])
    return resolve_settings(args, environ or {})


def test_defaults_are_tgis():
    config = parse([]).config
    assert (config.port, config.hostname, config.max_concurrent_requests, config.max_best_of) == (3000, "0.0.0.0", 128, 2)
    assert (config.max_stop_sequences, config.max_top_n_tokens, config.payload_limit) == (4, 5, 2_000_000)
    assert (config.waiting_served_ratio, config.max_waiting_tokens, config.cuda_memory_fraction) == (0.3, 20, 1.0)
    assert config.num_shard == 1 and config.model_id == ""


ENV_CASES = {
    "MODEL_ID": ("m", "model_id", "m"),
    "REVISION": ("r1", "revision", "r1"),
    "DTYPE": ("bfloat16", "dtype", "bfloat16"),
    "QUANTIZE": ("awq", "quantize", "awq"),
    "TRUST_REMOTE_CODE": ("true", "trust_remote_code", True),
    "MAX_CONCURRENT_REQUESTS": ("7", "max_concurrent_requests", 7),
    "MAX_BEST_OF": ("3", "max_best_of", 3),
    "MAX_STOP_SEQUENCES": ("9", "max_stop_sequences", 9),
    "MAX_TOP_N_TOKENS": ("8", "max_top_n_tokens", 8),
    "MAX_INPUT_TOKENS": ("100", "max_input_tokens", 100),
    "MAX_INPUT_LENGTH": ("101", "max_input_tokens", 101),
    "MAX_TOTAL_TOKENS": ("200", "max_total_tokens", 200),
    "MAX_BATCH_PREFILL_TOKENS": ("300", "max_batch_prefill_tokens", 300),
    "MAX_BATCH_TOTAL_TOKENS": ("4000", "max_batch_total_tokens", 4000),
    "WAITING_SERVED_RATIO": ("1.2", "waiting_served_ratio", 1.2),
    "MAX_WAITING_TOKENS": ("5", "max_waiting_tokens", 5),
    "HOSTNAME": ("127.0.0.1", "hostname", "127.0.0.1"),
    "PORT": ("8080", "port", 8080),
    "DISABLE_CUSTOM_KERNELS": ("1", "disable_custom_kernels", True),
    "CUDA_MEMORY_FRACTION": ("0.5", "cuda_memory_fraction", 0.5),
    "CUDA_GRAPHS": ("1,2,4", "cuda_graphs", (1, 2, 4)),
    "API_KEY": ("k", "api_key", "k"),
    "SERVED_MODEL_NAME": ("my-model", "served_model_name", "my-model"),
    "VALIDATION_WORKERS": ("3", "validation_workers", 3),
    "PAYLOAD_LIMIT": ("10", "payload_limit", 10),
    "CORS_ALLOW_ORIGIN": ("http://a,http://b", "cors_allow_origin", ("http://a", "http://b")),
    "JSON_OUTPUT": ("true", "json_output", True),
    "DISABLE_GRAMMAR_SUPPORT": ("true", "disable_grammar_support", True),
    "NUM_SHARD": ("1", "num_shard", 1),
    "LMPORT_BACKEND": ("cpu", "backend", "cpu"),
    "LMPORT_ASYNC_SCHEDULING": ("true", "async_scheduling", True),
    "LMPORT_ENGINE_PROCESS": ("false", "engine_process", False),
    "LMPORT_ENGINE_RESTARTS": ("2", "engine_restarts", 2),
}


@pytest.mark.parametrize("env_name", sorted(ENV_CASES))
def test_every_flag_reads_its_environment_variable(env_name):
    value, field, expected = ENV_CASES[env_name]
    assert getattr(parse([], {env_name: value}).config, field) == expected


def test_command_line_beats_environment_and_aliases_work():
    settings = parse(["--port", "9000", "--max-input-length", "50", "--trust-remote-code"], {"PORT": "8000", "TRUST_REMOTE_CODE": "false"})
    assert settings.config.port == 9000
    assert settings.config.max_input_tokens == 50
    assert settings.config.trust_remote_code is True
    assert parse(["--cuda-graphs", "0"]).config.cuda_graphs == ()


def test_hostname_from_the_environment_must_be_an_address():
    settings = parse([], {"HOSTNAME": "my-container-4f2a"})  # what shells and docker export
    assert settings.config.hostname == "0.0.0.0"
    assert any("HOSTNAME" in w for w in settings.warnings)


def test_bad_values_and_sharding_are_clear_errors():
    with pytest.raises(FlagError, match="PORT='x'"):
        parse([], {"PORT": "x"})
    with pytest.raises(FlagError, match="--sharded false contradicts --num-shard 2"):
        parse(["--num-shard", "2", "--sharded", "false"])
    with pytest.raises(FlagError, match="at least 1"):
        parse([], {"NUM_SHARD": "0"})
    config = parse([], {"NUM_SHARD": "4"}).config
    assert config.num_shard == 4 and config.num_shard_given and config.sharded is None
    config = parse(["--sharded", "true"]).config
    assert config.sharded and not config.num_shard_given


def test_tgi_only_flags_are_accepted_with_a_warning():
    settings = parse(["--validation-workers", "4", "--otlp-endpoint", "http://x"])
    assert any("--otlp-endpoint" in w for w in settings.warnings)
    assert settings.config.validation_workers == 4  # a real flag now: the tokenize pool's size
    assert not any("--validation-workers" in w for w in settings.warnings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launch_serves_and_exits_0_on_sigterm(tiny_llama, tmp_path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOSTNAME": "127.0.0.1", "MAX_BATCH_TOTAL_TOKENS": "4096",
           "JSON_OUTPUT": "true", "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from lmport.cli import launcher_main; sys.exit(launcher_main())",
             "--model-id", str(tiny_llama[0]), "--max-total-tokens", "256"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.2)
        else:
            raise AssertionError(f"no healthy server:\n{log_path.read_text()}")
        assert httpx.get(f"{url}/info").json()["max_total_tokens"] == 256

        result: dict = {}

        def long_request():
            body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 150}}
            result["response"] = httpx.post(f"{url}/generate", json=body, timeout=120)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(0.3)  # the request is in flight
        process.send_signal(signal.SIGTERM)
        worker.join(120)
        assert process.wait(60) == 0, log_path.read_text()
        assert result["response"].status_code == 200  # finished, not cut off
        assert int(result["response"].headers["x-generated-tokens"]) >= 1
    finally:
        if process.poll() is None:
            process.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert any("[3/4] loading weights" in m for m in messages)
    assert any("warm-up done" in m for m in messages)


def test_served_model_name_never_shows_a_local_path(tmp_path):
    from lmport.commands.launch import served_model_name
    from lmport.config import LaunchConfig

    folder = tmp_path / "private" / "llama-7b"
    folder.mkdir(parents=True)
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"")
    assert served_model_name(LaunchConfig(), str(folder)) == "llama-7b"
    assert served_model_name(LaunchConfig(), str(gguf)) == "model.Q4_K_M.gguf"
    assert served_model_name(LaunchConfig(), "org/some-model") == "org/some-model"  # a hub id, as given (TGI)
    assert served_model_name(LaunchConfig(served_model_name="prod"), str(folder)) == "prod"
