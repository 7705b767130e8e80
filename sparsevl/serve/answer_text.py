"""Token ids in, answer text out, as it grows: stop strings end the answer, and text that may still change
(a character split over tokens, trailing spaces, the start of a stop string) is held back from the stream,
so the streamed pieces always add up to the final answer."""


class AnswerText:
    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""  # text already handed out as pieces
        self.stopped = False  # a stop string was generated

    def push(self, token: int) -> str:
        """Add one generated token (not eos); returns the new text piece safe to show (maybe empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut].rstrip())
        return self._advance(self._settled(text))

    def finish(self) -> str:
        """The rest of the answer once generation ended."""
        return self._advance(self.text)

    @property
    def text(self) -> str:
        """The answer so far as it will be returned: up to the first stop string, stripped."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut].strip()

    def _settled(self, text: str) -> str:
        """`text` minus what may still change: an incomplete character, trailing spaces, a partial stop string."""
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        text = text.rstrip()
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:length]):
                    text = text[:-length].rstrip()
                    break
        return text

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # one more token rewrote earlier text: keep what was shown
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece
