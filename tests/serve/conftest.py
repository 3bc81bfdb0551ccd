"""A tiny random checkpoint served by the real Gradio app on 127.0.0.1 (free port), shared by the serve tests."""

import socket

import pytest

from llava.serve.gradio_web_server import build_demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_server(tiny_hf):
    demo = build_demo(str(tiny_hf), max_new_tokens=6, concurrency_limit=4)
    port = free_port()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    yield demo, url
    demo.close()


@pytest.fixture(scope="session")
def client(demo_server):
    from gradio_client import Client

    return Client(demo_server[1], verbose=False)
