"""Request validation: the OpenAI request bodies this server honours, as typed objects, and every client
mistake that can be found before a request is queued, as a ``RequestError`` (a 4xx with OpenAI's body).

The bodies are the subset of the OpenAI API that a local model can honour: fields it cannot honour
(``n``, ``logprobs``, ``echo``, the penalties) are refused rather than silently ignored, and fields that
carry nothing a local model acts on (``user``, ``metadata``, ...) are ignored.
"""

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.params import SamplingParams, ServeParams
from lmforge.serving.model import ServedModel
from lmforge.serving.wire import RequestError


class SamplingFields(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")  # user, metadata, ... carry nothing a local model acts on

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def asked_tokens(self) -> int | None:
        """The most new tokens the client asked for (None: the server's default)."""
        return self.max_tokens

    def include_usage(self) -> bool:
        """Whether a stream ends with the token counts (``stream_options.include_usage``)."""
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise RequestError("only text content parts are supported", "messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def asked_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) over ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them; ``developer`` is OpenAI's newer name for ``system``."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False

    def prompt_text(self) -> str:
        """The request's one prompt: the server batches concurrent requests itself, so a list of prompts
        (OpenAI's batch form) would only hide one client's work from that batching.  ``echo`` (the prompt
        repeated before the answer) is refused."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError("send one prompt per request (the server batches concurrent requests itself)", "prompt")
            prompt = prompt[0]
        if self.echo:
            raise RequestError("echo is not supported", "echo")
        return prompt


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, description="the `id` of the completion being rated")
    rating: int = Field(ge=1, le=5, description="1 (bad) to 5 (good)")
    correction: str | None = Field(None, min_length=1, description="the answer the model should have given")
    comment: str | None = None


def invalid_body(errors: list[dict[str, Any]]) -> RequestError:
    """The first of pydantic's errors about a body (FastAPI's ``RequestValidationError.errors()``) as one
    400 naming the field: OpenAI clients show ``message``, not FastAPI's list of errors."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return RequestError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return RequestError(f"{where}: {first.get('msg')}" if where else str(first.get("msg")), where or None)


def check_model(name: str, served: ServedModel) -> None:
    """A request must name the model served (by its served name or the reference it was loaded from)."""
    if name not in (served.name, served.ref):
        raise RequestError(f"the model '{name}' does not exist here; this server serves '{served.name}' (GET /v1/models)",
                           "model", status=404, code="model_not_found", kind="not_found_error")


def check_template(served: ServedModel) -> None:
    """A chat needs the model's chat template: a base model would read the turns as plain text."""
    from models.generation import has_chat_template

    if not has_chat_template(served.tokenizer):
        raise RequestError(f"'{served.name}' has no chat template (it is not an instruct model): use /v1/completions", "messages")


def sampling_of(req: SamplingFields, settings: ServeParams, defaults: SamplingParams) -> tuple[SamplingParams, tuple[str, ...]]:
    """The request's sampling settings over the server's ``defaults`` (``evaluate.sampling``), with its
    ``max_new_tokens`` (``serve.max_tokens`` unless asked, within ``serve.max_tokens_limit``), and its
    stop strings."""
    if req.n != 1:
        raise RequestError("only n=1 is supported", "n")
    if req.logprobs not in (None, False, 0):
        raise RequestError("logprobs are not supported", "logprobs")
    if req.presence_penalty or req.frequency_penalty:
        raise RequestError("presence_penalty and frequency_penalty are not supported (use temperature/top_p)",
                           "presence_penalty" if req.presence_penalty else "frequency_penalty")
    asked = req.asked_tokens()
    wanted = settings.max_tokens if asked is None else asked
    if not 1 <= wanted <= settings.max_tokens_limit:
        raise RequestError(f"max_tokens must be between 1 and {settings.max_tokens_limit}, not {wanted}", "max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise RequestError("at most 4 stop sequences", "stop")
    sampling = dataclasses.replace(
        defaults, max_new_tokens=wanted, temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p, seed=defaults.seed if req.seed is None else req.seed)
    return sampling, stop


def prompt_ids(served: ServedModel, text: str, max_new: int, chat: bool = False) -> list[int]:
    """``text``'s token ids, refused when they and ``max_new`` more do not fit the model's context, or when
    there are none.  A chat's text already holds the template's special tokens: none are added."""
    ids = served.tokenizer(text, add_special_tokens=not chat)["input_ids"]
    limit = served.context_length
    if limit is not None and len(ids) + max_new > limit:
        raise RequestError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens and "
                           f"max_tokens asks for {max_new} more: shorten the prompt or lower max_tokens", "messages" if chat else "prompt",
                           code="context_length_exceeded")
    if not ids:
        raise RequestError("the prompt is empty", "messages" if chat else "prompt")
    return ids


def chat_prompt_ids(served: ServedModel, messages: list[dict[str, str]], max_new: int) -> list[int]:
    """The conversation through the model's chat template, up to the opening of the assistant's turn."""
    try:
        text = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # e.g. a template that refuses a system turn, or roles out of order
        raise RequestError(f"the model's chat template refused the messages: {exc}", "messages") from None
    return prompt_ids(served, text, max_new, chat=True)
