"""Take docs/img/demo.png from the real demo in headless chromium (see docs/demo.md).

    python scripts/demo_screenshot.py [--model-path P] [--out docs/img/demo.png]

Without --model-path it uses the built-in toy checkpoint if present, else a tiny random model with
LLaVA-1.5's geometry (576 vision tokens, 32 layers) written to a temp dir.
"""

import argparse
import socket
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from llava.model.builder import DEFAULT_MODEL_PATH
from llava.serve.gradio_web_server import build_demo

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--out", default="docs/img/demo.png")
    parser.add_argument("--question", default=None, help="default: the first example's question")
    args = parser.parse_args()
    model_path = args.model_path
    if model_path is None and not (DEFAULT_MODEL_PATH / "config.json").is_file():
        from learnpruner_ext.tiny import save_tiny_checkpoint

        model_path = str(save_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "hf", text_layers=32, image_size=336, patch_size=14))
        print(f"no toy checkpoint at {DEFAULT_MODEL_PATH}; using a tiny RANDOM model at {model_path}")
    demo = build_demo(model_path, max_new_tokens=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    example, example_question = demo.examples[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(url)
            page.locator("#image_input input[type=file]").set_input_files(str(example))
            page.locator("#image_input img").first.wait_for()
            page.locator("#question textarea").fill(args.question or example_question)
            page.locator("#also_unpruned input").check()
            page.locator("#ask").click()
            page.wait_for_function("() => document.querySelector('#answer textarea')?.value.length > 0", timeout=120_000)
            page.locator("#overlay img").first.wait_for()
            page.wait_for_timeout(1500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
