"""`sparsevl chat`: talk about an image in the terminal; answers stream token by token.

Reads one question per line from stdin (a terminal or a pipe). Commands: /reset (forget the conversation),
/image PATH (switch image, forget the conversation), /help, /quit.
"""

import argparse
import sys
from pathlib import Path

from sparsevl.data.dataset import load_image
from sparsevl.model.inference_flags import add_inference_flags

HELP = "commands: /reset forget the conversation, /image PATH switch image, /help this text, /quit leave"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint directory")
    p.add_argument("--image", required=True, help="image file to talk about")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample at this temperature")
    p.add_argument("--max_new_tokens", type=int, default=64, help="longest answer in tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    add_inference_flags(p)
    return p


class ChatSession:
    """One conversation about one image: history of turns, commands, streamed answers written to `out`."""

    def __init__(self, assistant, image_path: str, *, out, temperature: float, max_new_tokens: int, seed: int):
        self.assistant, self.out = assistant, out
        self.image = load_image(Path(image_path))
        self.options = {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
        self.history: list[dict] = []

    def handle(self, line: str) -> bool:
        """Answer or run one input line; False when the user quits."""
        line = line.strip()
        if not line:
            return True
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.history = []
            self.write("(conversation reset)\n")
        elif command == "/image":
            self.image, self.history = load_image(Path(argument.strip())), []
            self.write(f"(now talking about {argument.strip()}; conversation reset)\n")
        elif command == "/help":
            self.write(HELP + "\n")
        elif command.startswith("/"):
            self.write(f"unknown command {command!r}; {HELP}\n")
        else:
            self.ask(line)
        return True

    def ask(self, question: str) -> None:
        self.write("ASSISTANT: ")
        answer = self.assistant.ask(self.image, question, history=self.history, on_text=self.write, **self.options)
        self.write("\n")
        self.history += [{"from": "human", "value": question}, {"from": "gpt", "value": answer.text}]

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not Path(args.image).is_file():
        print(f"sparsevl chat: --image {args.image} does not exist", file=sys.stderr)
        return 2
    from sparsevl.serve.assistant import VisionAssistant

    try:
        assistant = VisionAssistant.load(args.model, args)
        session = ChatSession(assistant, args.image, out=sys.stdout, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl chat: {error}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Talking about {args.image}. {HELP}")
    while True:
        if interactive:
            print("USER: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        try:
            if not session.handle(line):
                return 0
        except ValueError as error:  # a bad /image path, an over-long question: report and carry on
            print(f"\nerror: {error}", file=sys.stderr)
