"""The OpenAI-compatible request bodies the server accepts, and chat templates.

Bodies are pydantic models with `extra="forbid"`: a misspelt or unsupported field is a
422 naming it, never silently ignored. Sampling fields beyond OpenAI's (`top_k`, `min_p`,
`repetition_penalty`) are accepted as extensions (the `openai` client sends them with
`extra_body=`). Value ranges are checked by the samplers' own validation
(`SamplingParams.make`), so the server and `generate` accept exactly the same settings.
"""

from __future__ import annotations

import json
import pathlib
from typing import Literal

import pydantic

# What a chat becomes when the checkpoint brings no template: one "role: content" line
# per message, then "assistant:" for the model to continue. Plain text, so that it works
# with any tokenizer (a character vocabulary has no special tokens).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    user: str | None = None
    ignore_eos: bool = False  # extension (as in vLLM): generate past the end-of-sequence token

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> str | None:
        """Why a syntactically valid body asks for something this server does not do, else None."""
        if self.n != 1:
            return f"n={self.n}: only one choice per request is supported"
        if self.frequency_penalty != 0:
            return "frequency_penalty is not supported; use presence_penalty or repetition_penalty"
        if any(not s for s in self.stop_strings()):
            return "stop: an empty stop string would stop at once"
        return None


class CompletionBody(_Body):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo=true is not supported"
        if self.logprobs is not None:
            return "logprobs are not supported"
        return super().unsupported()


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = None


def find_chat_template(run_dir: str | pathlib.Path) -> str | None:
    """The chat template a run directory brings (a converted Hugging Face tokenizer's), if any."""
    tokenizer_dir = pathlib.Path(run_dir) / "tokenizer"
    for directory in (tokenizer_dir, tokenizer_dir / "hf"):
        if (directory / "chat_template.jinja").is_file():
            return (directory / "chat_template.jinja").read_text(encoding="utf-8")
        config = directory / "tokenizer_config.json"
        if config.is_file():
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    return None


class ChatTemplateError(ValueError):
    """A chat template refused a conversation (its `raise_exception(...)`) or failed on it."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


class ChatTemplate:
    """A Jinja chat template, rendered in a sandbox (templates come with downloaded checkpoints).

    Templates may call `raise_exception(message)`, as Hugging Face templates do to refuse a
    conversation (roles that do not alternate, say); `render` raises ChatTemplateError.
    """

    def __init__(self, source: str | None = None, *, bos_token: str = "", eos_token: str = ""):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = DEFAULT_CHAT_TEMPLATE if source is None else source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(self.source)
        self._specials = dict(bos_token=bos_token, eos_token=eos_token)

    def render(self, messages: list[ChatMessage]) -> str:
        import jinja2

        try:
            return self._template.render(messages=[m.model_dump(exclude_none=True) for m in messages],
                                         add_generation_prompt=True, **self._specials)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
