"""`sparsevl serve`: a Gradio web demo. Upload an image, ask a question, read the answer; side panels show
which visual tokens the LLM kept (overlay on the image) and, for MoE models, the load on each expert.

Binds 127.0.0.1 unless --host says otherwise. Uploads are capped in size (by Gradio's upload route and again
here) and must be PNG/JPEG/WEBP/BMP/GIF images; rejections are shown as a message on the page.
"""

import argparse
import ipaddress
import sys

from sparsevl.model.inference_flags import add_inference_flags
from sparsevl.serve.assistant import ACCEPTED_FORMATS, UploadError, VisionAssistant, describe_expert_load, \
    describe_kept, kept_token_overlay, model_view, open_upload

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the default theme would fetch Google fonts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback exposes the demo to the network")
    p.add_argument("--port", type=int, default=7860, help="TCP port to listen on")
    p.add_argument("--max_upload_mb", type=float, default=10.0, help="largest accepted upload in MB")
    p.add_argument("--max_new_tokens", type=int, default=64, help="default longest answer in tokens")
    p.add_argument("--queue_size", type=int, default=64, help="requests waiting beyond this are refused")
    add_inference_flags(p)
    return p


class DemoHandlers:
    """The callbacks behind the page, in plain Python: each returns the values of the output components."""

    def __init__(self, assistant: VisionAssistant, *, max_upload_bytes: int):
        self.assistant, self.max_upload_bytes = assistant, max_upload_bytes

    def preview(self, file_path: str | None):
        """On upload: the image as the model sees it, with its patch grid (or the rejection message)."""
        if file_path is None:
            return None, ""
        try:
            image = open_upload(file_path, max_bytes=self.max_upload_bytes)
        except UploadError as error:
            return None, str(error)
        return kept_token_overlay(model_view(image, self.assistant.image_processor), None,
                                  self.assistant.patch_grid), ""

    def answer(self, file_path: str | None, question: str, max_new_tokens: float, temperature: float):
        """-> (answer, message, overlay image, kept-token note, expert-load Markdown)."""
        if file_path is None:
            return "", "upload an image first", None, "", ""
        try:
            image = open_upload(file_path, max_bytes=self.max_upload_bytes)
            result = self.assistant.ask(image, question, max_new_tokens=int(max_new_tokens),
                                        temperature=float(temperature))
        except ValueError as error:  # UploadError, empty question
            return "", str(error), None, "", ""
        grid = self.assistant.patch_grid
        overlay = kept_token_overlay(model_view(image, self.assistant.image_processor), result.kept_patches, grid)
        return (result.text, "", overlay, describe_kept(result, grid), describe_expert_load(result.expert_load))


def build_app(assistant: VisionAssistant, *, max_upload_mb: float = 10.0, max_new_tokens: int = 64,
              queue_size: int = 64):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    handlers = DemoHandlers(assistant, max_upload_bytes=int(max_upload_mb * 2**20))
    with gr.Blocks(title="sparsevl demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("## sparsevl: ask a question about an image")
        with gr.Row():
            with gr.Column():
                image_file = gr.File(label=f"Image ({', '.join(ACCEPTED_FORMATS)}; at most {max_upload_mb:g} MB)",
                                     file_types=["image"], type="filepath", elem_id="image_file")
                question = gr.Textbox(label="Question", elem_id="question", lines=1)
                with gr.Row():
                    max_tokens = gr.Slider(1, 256, value=max_new_tokens, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                message = gr.Markdown(elem_id="message")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
            with gr.Column():
                overlay = gr.Image(label="Visual tokens kept", type="pil", interactive=False, elem_id="overlay")
                kept_note = gr.Markdown(elem_id="kept_note")
                gr.Markdown("### Expert load")
                experts = gr.Markdown(elem_id="expert_load")
        image_file.change(handlers.preview, inputs=image_file, outputs=[overlay, message])
        outputs = [answer, message, overlay, kept_note, experts]
        inputs = [image_file, question, max_tokens, temperature]
        ask.click(handlers.answer, inputs=inputs, outputs=outputs)
        question.submit(handlers.answer, inputs=inputs, outputs=outputs)
    return app.queue(max_size=queue_size, default_concurrency_limit=1)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.max_upload_mb <= 0:
        print(f"sparsevl serve: --max_upload_mb must be > 0, got {args.max_upload_mb}", file=sys.stderr)
        return 2
    try:
        assistant = VisionAssistant.load(args.model, args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl serve: {error}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        print(f"sparsevl serve: WARNING listening on {args.host}: the demo is reachable from the network",
              file=sys.stderr)
    app = build_app(assistant, max_upload_mb=args.max_upload_mb, max_new_tokens=args.max_new_tokens,
                    queue_size=args.queue_size)
    import gradio as gr

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=args.host, server_port=args.port, max_file_size=int(args.max_upload_mb * 2**20),
               ssr_mode=False, show_error=True, share=False, inbrowser=False, enable_monitoring=False, theme=theme)
    return 0
