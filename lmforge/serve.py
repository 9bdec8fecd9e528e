"""``lmforge serve``: a model behind the OpenAI HTTP API, with requests batched on the server.

Applications, SDKs and tools speak the OpenAI API, so that is what a model in use should answer:
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template;
``"stream": true`` as server-sent events), ``GET /health``, and ``POST /v1/feedback`` (lmforge's own:
ratings and corrections of answers, the start of the feedback loop).  Responses are the ``openai``
package's own pydantic types, so what the official client parses is what is sent.

**Batching.**  ``serve.engine: dynamic`` (the default): the first waiting request opens a batch that
others may join for ``serve.batch_wait_ms`` (up to ``serve.max_batch_size``; requests with other
sampling settings wait for the next batch), and the batch generates together (``models.batching``)
until its longest request ends (``lmforge.serving.engine.Batcher``).  ``serve.engine: continuous``: greedy requests join and
leave the running batch at every step, through transformers' continuous batching
(``models.batching.ContinuousBatching``, a paged KV cache of ``serve.kv_cache_tokens``);
``serve.engine: onnx``: the same over the model's ONNX twin in ONNX Runtime (``models.onnx_genai``),
the fastest here by far.  Sampled requests still go to dynamic batches.  Each request is streamed and stopped on its own either way.
Which is faster depends on the load (docs/serving.md#speed).

**Why not a serving library.**  LitServe's OpenAI spec (0.2.19) serves chat completions only, assigns
the response ``id`` in the HTTP process, where the model's code cannot record it (the feedback loop
needs id → prompt → answer), and reports errors of a streamed request as a 200 followed by an error
chunk.  FastAPI and uvicorn (already in the lock for MLflow and Dagster) carry the protocol here; the
``openai`` types carry its shapes.

**Errors** are 4xx with OpenAI's ``{"error": {"message", "type", "param", "code"}}`` body, checked before
a request is queued: malformed JSON or fields (400), an unknown model (404), a prompt that does not
fit the context with its ``max_tokens`` (400), ``max_tokens`` out of range (400), a missing or wrong
API key (401), a body over ``serve.max_request_bytes`` (413, refused before it is read), more than
``serve.max_requests_per_client`` requests in progress from one address (429).  Tokenizing runs off the
event loop, so a long prompt does not hold up ``/health`` or other clients.  A failure while generating
fails that batch's requests with a 500 and leaves the server up.

**Every answer is recorded** in the feedback store (``lmforge.feedback_store``) before it is sent.

**In parts** (``lmforge/serving/``), each testable alone: ``requests`` validates the bodies, ``wire``
builds OpenAI's responses, events and errors, ``engine`` batches and generates, ``recording`` writes the
feedback store, ``access`` checks the key, a client's share and the body size, ``model`` loads what is
served, ``live`` swaps versions when the alias moves, and ``app`` wires the routes.  This module is the
front door the command line (and whoever else serves a model) imports.
"""

from lmforge.serving.access import is_loopback
from lmforge.serving.app import create_app
from lmforge.serving.model import AliasFollower, ServedModel, load_served, onnx_model

__all__ = ["AliasFollower", "ServedModel", "create_app", "is_loopback", "load_served", "onnx_model"]
