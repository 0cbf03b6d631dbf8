"""A Gradio demo of a tiny_hf model: chat, grounded answers, tokenizer playground, attention maps and the model card.

    tiny-hf chat --model runs/chat        # then open http://127.0.0.1:7860 (`make chat` makes runs/chat)
    tiny-hf chat --model smollm2          # SmolLM2-135M-Instruct, after `tiny-hf fetch smollm2`
    tiny-hf chat --model runs/sft --rag-index runs/rag-index   # adds the "Ask the docs" tab

`--model` is a run folder (`make demo` writes `runs/demo`, a base model; `make chat` fine-tunes it into `runs/chat`,
which answers in turns; a run folder's `model/` subfolder is loaded and its `loss_curve.png` and `summary.md` go on
the model card), a model folder, a Hub id, or the short name of a fetched model (`smollm2`). Generation goes through
`tiny_hf.engine` (an `EngineLoop` in a background thread), so several browser tabs chatting at once share one
continuously batched forward pass instead of queueing behind each other.

Tabs, and the API endpoints behind them (for `gradio_client.Client(url).predict(..., api_name=...)`):

- **Chat**: streaming replies, sampling controls and a system prompt. The conversation goes through the chat
  template; when it outgrows the context window the oldest turns are left out (the system prompt stays).
  `/chat(message, history, system_prompt, temperature, top_p, top_k, max_tokens, repetition_penalty)` streams
  the growing reply text; `history` is a list of `{"role": ..., "content": ...}` dicts (or None).
- **Ask the docs** (only with `--rag-index DIR`, an index folder of `tiny-hf index`): a question answered
  greedily from the index's passages, cited as [1], [2] (rag/answer.py, on the same engine loop as the chat).
  `/ask(question, k, mode, max_tokens)` streams (passages, answer): the passages that fit the prompt as a table
  (columns #, document, score, cited: ✓ once the answer cites it, passage) and the growing answer text.
- **Tokenizer**: the text cut into its tokens, each labelled with its id. `/tokenize(text)` returns the
  (token text, ids) spans, whose texts join back into the input, and a line of counts.
- **Attention**: one head's attention probabilities over a prompt as a heatmap. `/attention(prompt, layer, head)`.
- **Model card**: the config, parameter count and the run's training curves and summary.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from matplotlib.figure import Figure

import tiny_hf  # noqa: F401  (registers the Auto classes, so run folders load without trust_remote_code)
from app.launch import LOAD_ERRORS, ModelOptions, RetrievalOptions, cannot_load, load_engine
from rag.answer import Source, cite, grounded_prompt
from rag.index import SEARCH_MODES, load_rag_index
from tiny_hf.chat import CHAT_SAMPLING, end_of_turn_ids
from tiny_hf.engine import ContextWindowError, Engine, EngineLoop, SamplingParams, fit_messages
from tiny_hf.options import parse_options

RUN_FILES = ("loss_curve.png", "summary.md")  # what training/report.py writes beside it
ATTENTION_MAX_TOKENS = 48  # a heatmap with more rows than this is unreadable
TOKENIZE_MAX_CHARS = 20_000  # keeps one request from tying up the tokenizer tab
PASSAGE_COLUMNS = ["#", "document", "score", "cited", "passage"]  # the Ask the docs table


# ---------------------------------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------------------------------
def message_text(content) -> str:
    """The text of a chat message's content: a string (OpenAI style) or Gradio 6's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def chat_prompt(engine: Engine, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
    """Token ids of `messages` through the chat template, fitted into the window less `max_tokens` of room for the
    reply by leaving out the oldest turns; and how many messages were left out. Raises ContextWindowError when even
    the system prompt and the last message do not fit."""
    budget = engine.max_seq_len - max_tokens
    if budget < 1:
        raise ContextWindowError(
            f"max_tokens={max_tokens} leaves no room for a prompt in the {engine.max_seq_len}-token window"
        )
    return fit_messages(engine.tokenizer, messages, budget=budget, policy="truncate")


def chat_params(
    tokenizer, *, temperature: float, top_p: float, top_k: int, max_tokens: int, repetition_penalty: float
) -> SamplingParams:
    """SamplingParams for a chat reply: it stops at the end of the assistant's turn. Raises ValueError."""
    return SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        stop_token_ids=end_of_turn_ids(tokenizer),
    )


def stream_reply(loop: EngineLoop, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
    """The reply so far after each step: the growing text, not deltas (what a Gradio stream shows). Raises gr.Error
    (shown to the user) when the engine is full, shutting down or has failed."""
    reply = ""
    try:
        for out in loop.stream(prompt_ids, params):
            if out.text:
                reply += out.text
                yield reply
            if out.finished and out.finish_reason == "abort" and loop.error is not None:
                raise RuntimeError(f"the engine stopped: {loop.error!r}")
    except RuntimeError as error:  # QueueFullError is one too
        raise gr.Error(str(error)) from None
    if not reply:
        yield reply  # the model ended its turn at once: still one (empty) answer


# ---------------------------------------------------------------------------------------------------------------------
# Ask the docs
# ---------------------------------------------------------------------------------------------------------------------
def passage_rows(sources: Sequence[Source], citations: Sequence[Source] = ()) -> list[list]:
    """The rows of the passages table (`PASSAGE_COLUMNS`): number, document id, score, ✓ if cited, text."""
    cited = {c.number for c in citations}
    return [[s.number, s.doc_id, round(s.score, 4), "✓" if s.number in cited else "", s.text] for s in sources]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer playground
# ---------------------------------------------------------------------------------------------------------------------
def token_spans(tokenizer, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Cut the decoded text into one span per token: (its text, [its id]). The spans' texts join into exactly
    `tokenizer.decode(ids)`.

    A character that a byte-level BPE splits over several tokens (é is two bytes, an emoji four) has no text of
    its own per token, so those tokens share one span (its text, [their ids]). Each span is decoded with a few
    tokens before it as context, because some decoders (SentencePiece's leading space) depend on what precedes.
    """

    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(list(part), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    spans, start = [], 0  # ids[start:] are not in a span yet
    for end in range(1, len(ids) + 1):
        context = max(0, start - 4)
        before, text = decode(ids[context:start]), decode(ids[context:end])
        if text.endswith("\ufffd") and end < len(ids):
            continue  # an incomplete character: take the next token's bytes too
        spans.append((text[len(before) :], list(ids[start:end])))
        start = end
    return spans


def tokenize(tokenizer, text: str) -> tuple[list[tuple[str, str]], str]:
    """`text` as (token text, "id") spans for `gr.HighlightedText` (one label per id, so one colour each) and a
    Markdown line with the counts. Special tokens written in the text count as such (the tokenizer splits them)."""
    text = text[:TOKENIZE_MAX_CHARS]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    spans = [(piece, " ".join(map(str, span_ids))) for piece, span_ids in token_spans(tokenizer, ids)]
    chars, nbytes, count = len(text), len(text.encode("utf-8")), len(ids)
    stats = f"**{count}** tokens · **{chars}** characters · **{nbytes}** UTF-8 bytes"
    if count:
        stats += f" · **{chars / count:.2f}** characters/token · **{nbytes / count:.2f}** bytes/token"
    return spans, stats


# ---------------------------------------------------------------------------------------------------------------------
# Attention view
# ---------------------------------------------------------------------------------------------------------------------
def tick_label(piece: str) -> str:
    """A token's text as an axis label: spaces and newlines made visible, long ones cut."""
    piece = piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return piece if len(piece) <= 12 else piece[:11] + "…"


def _one_span_per_token(tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """`token_spans`, but one entry per token (the axes need one label per row): a multi-token character is shown
    on its last token, its other tokens by their ids."""
    out = []
    for piece, span_ids in token_spans(tokenizer, ids):
        out += [(f"#{i}", [i]) for i in span_ids[:-1]] + [(piece, span_ids[-1:])]
    return out


@torch.inference_mode()
def attention_map(engine: Engine, prompt: str, layer: int, head: int) -> tuple[torch.Tensor, list[str]]:
    """One head's attention probabilities (T, T) over the first `ATTENTION_MAX_TOKENS` tokens of `prompt`, and the
    tokens' labels. Rows are queries, columns keys. Raises ValueError for a bad layer/head or an empty prompt."""
    config = engine.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if not 0 <= layer < layers:
        raise ValueError(f"layer={layer} is not in [0, {layers})")
    if not 0 <= head < heads:
        raise ValueError(f"head={head} is not in [0, {heads})")
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids[: min(ATTENTION_MAX_TOKENS, engine.max_seq_len)]
    if not ids:
        raise ValueError("the prompt is empty")
    # A cache-free forward of its own: the model holds no state, so it can run beside the engine thread.
    out = engine.model(torch.tensor([ids], device=engine.device), output_attentions=True, use_cache=False)
    probs = out.attentions[layer][0, head].float().cpu()  # (T, T)
    labels = [tick_label(piece) for piece, _ in _one_span_per_token(engine.tokenizer, ids)]
    return probs, labels


def attention_figure(engine: Engine, prompt: str, layer: int, head: int) -> Figure:
    """The heatmap of `attention_map` with token labels on both axes (a bare Figure: no pyplot state)."""
    probs, labels = attention_map(engine, prompt, layer, head)
    size = min(12.0, 3.0 + 0.22 * len(labels))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(f"layer {layer}, head {head}: attention probabilities")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------
def model_summary(engine: Engine, model: str) -> str:
    """A Markdown table: where the model came from, its size and shape, and how the engine runs it."""
    params = sum(p.numel() for p in engine.model.parameters())
    embedding = engine.model.get_input_embeddings().weight.numel()
    config = engine.config
    shape = f"{config.num_hidden_layers} · {config.hidden_size} · {config.num_attention_heads}"
    rows = [
        ("architecture", f"{type(engine.model).__name__} (`{config.model_type}`)"),
        ("parameters", f"{params:,} ({params - embedding:,} without the token embedding)"),
        ("layers · hidden · heads", shape),
        ("vocabulary", f"{config.vocab_size:,} ({type(engine.tokenizer).__name__})"),
        ("context window (engine)", f"{engine.max_seq_len} tokens"),
        ("device · dtype", f"{engine.device} · {str(engine.dtype).removeprefix('torch.')}"),
    ]
    return f"| model | `{model}` |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def find_run_file(run_dirs: list[Path], name: str) -> Path | None:
    """The first `name` in `run_dirs` (the model folder, then its run folder), if any."""
    return next((d / name for d in run_dirs if (d / name).is_file()), None)


# ---------------------------------------------------------------------------------------------------------------------
# The handlers every tab calls, over one engine loop
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DemoApp:
    """What the tabs share: the running engine loop, the model's name and run folders, and the retrieval index.
    Its methods are the handlers behind the tabs and the API endpoints; errors reach the user as `gr.Error`."""

    loop: EngineLoop
    model: str
    run_dirs: list[Path] = field(default_factory=list)
    rag_index: object | None = None  # a rag.index.RagIndex: the Ask the docs tab
    max_batch_size: int = 8  # replies generated together; more wait in Gradio's queue

    @property
    def engine(self) -> Engine:
        return self.loop.engine

    @property
    def reply_room(self) -> int:
        """The most tokens a reply may take; the rest of the window is for the conversation."""
        return max(1, self.engine.max_seq_len // 2)

    def params(self, temperature, top_p, top_k, max_tokens, repetition_penalty) -> SamplingParams:
        try:
            return chat_params(
                self.engine.tokenizer,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_tokens=max_tokens,
                repetition_penalty=repetition_penalty,
            )
        except ValueError as error:
            raise gr.Error(str(error)) from None

    def chat(
        self,
        message: str,
        history: list[dict] | None = None,
        system_prompt: str = "",
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 50,
        max_tokens: int = 64,
        repetition_penalty: float = 1.1,
    ) -> Iterator[str]:
        """Stream the assistant's reply to `message` after `history` (a list of {"role", "content"} dicts)."""
        params = self.params(temperature, top_p, top_k, max_tokens, repetition_penalty)
        history = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []]
        messages = with_system(system_prompt, [*history, {"role": "user", "content": message}])
        try:
            prompt_ids, _ = chat_prompt(self.engine, messages, params.max_tokens)
        except ContextWindowError as error:
            raise gr.Error(str(error)) from None
        yield from stream_reply(self.loop, prompt_ids, params)

    def respond(
        self, history: list[dict], system_prompt: str, temperature, top_p, top_k, max_tokens, repetition_penalty
    ) -> Iterator[list[dict]]:
        """The Chat tab's handler: the Chatbot's messages in, the same with the growing reply out."""
        if not history or history[-1]["role"] != "user":
            yield history  # nothing new to answer (an empty message was sent)
            return
        params = self.params(temperature, top_p, top_k, max_tokens, repetition_penalty)
        # Notices (messages with a title, below) are for the reader, not the model.
        conversation = [
            {"role": m["role"], "content": message_text(m["content"])}
            for m in history
            if not (m.get("metadata") or {}).get("title")
        ]
        try:
            prompt_ids, dropped = chat_prompt(self.engine, with_system(system_prompt, conversation), params.max_tokens)
        except ContextWindowError as error:
            # Take the message back out (sent again, it would fail again) and say why, in the chat.
            notice = {
                "role": "assistant",
                "content": f"{error}. Shorten the message or the system prompt, or lower max new tokens.",
                "metadata": {"title": "⚠️ This message does not fit the context window and was not sent"},
            }
            yield [*history[:-1], notice]
            return
        if dropped:
            window = self.engine.max_seq_len
            gr.Warning(f"The {dropped} oldest messages did not fit the {window}-token window: left out.")
        answer = {"role": "assistant", "content": ""}
        history = [*history, answer]
        yield history
        for reply in stream_reply(self.loop, prompt_ids, params):
            answer["content"] = reply
            yield history

    def ask(self, question: str, k: int = 4, mode: str = "hybrid", max_tokens: int = 64) -> Iterator[tuple[list, str]]:
        """Stream (the passages table, the answer so far); the cited column fills in as the answer cites."""
        params = self.params(0.0, 1.0, 0, max_tokens, 1.0)  # greedy: the same answer on every run
        try:
            prompt_ids, sources, dropped = grounded_prompt(
                question,
                self.rag_index,
                self.engine.tokenizer,
                window=self.engine.max_seq_len,
                k=int(k),
                mode=mode,
                max_new_tokens=params.max_tokens,
            )
        except ValueError as error:
            raise gr.Error(str(error)) from None
        if dropped:
            gr.Warning(f"{dropped} of the {len(sources) + dropped} passages did not fit the prompt: left out.")
        yield passage_rows(sources), ""
        for reply in stream_reply(self.loop, prompt_ids, params):
            grounded = cite(reply.strip(), sources)
            yield passage_rows(sources, grounded.citations), grounded.text

    def tokenize(self, text: str) -> tuple[list[tuple[str, str]], str]:
        return tokenize(self.engine.tokenizer, text)

    def attention(self, prompt: str, layer: int, head: int) -> Figure:
        try:
            return attention_figure(self.engine, prompt, int(layer), int(head))
        except ValueError as error:
            raise gr.Error(str(error)) from None


def with_system(system_prompt: str, messages: list[dict]) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    return system + messages


# ---------------------------------------------------------------------------------------------------------------------
# The tabs: one function each, building its components and wiring them to the handlers
# ---------------------------------------------------------------------------------------------------------------------
GENERATE = {"concurrency_id": "generate"}  # every generating event shares one queue, as wide as the engine's batch


def sampling_controls(reply_room: int) -> list[gr.Slider]:
    """temperature, top_p, top_k, max new tokens and repetition penalty, in the order the handlers take them."""
    with gr.Row():
        temperature = gr.Slider(
            0,
            2,
            value=CHAT_SAMPLING["temperature"],
            step=0.05,
            label="temperature (0 = greedy)",
            elem_id="temperature",
        )
        top_p = gr.Slider(0.05, 1, value=CHAT_SAMPLING["top_p"], step=0.05, label="top_p")
        top_k = gr.Slider(0, 200, value=CHAT_SAMPLING["top_k"], step=1, precision=0, label="top_k (0 = off)")
    with gr.Row():
        max_tokens = gr.Slider(1, reply_room, value=min(128, reply_room), step=1, precision=0, label="max new tokens")
        repetition_penalty = gr.Slider(
            0.5, 2, value=CHAT_SAMPLING["repetition_penalty"], step=0.05, label="repetition penalty (1 = off)"
        )
    return [temperature, top_p, top_k, max_tokens, repetition_penalty]


def add_user_message(message: str, history: list[dict]) -> tuple[str, list[dict]]:
    if not message.strip():
        return message, history
    return "", [*history, {"role": "user", "content": message}]


def chat_tab(app: DemoApp) -> None:
    """Streaming chat with a system prompt and sampling controls, Stop and Clear; and the /chat API endpoint."""
    with gr.Tab("Chat", id="chat"):
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot", buttons=["copy"])
        message = gr.Textbox(
            placeholder="Type a message and press Enter", show_label=False, submit_btn="Send", elem_id="chat-input"
        )
        with gr.Row():
            stop = gr.Button("Stop", variant="stop", size="sm")
            clear = gr.ClearButton([message, chatbot], value="Clear", size="sm")
        with gr.Accordion("System prompt and sampling", open=False):
            system_prompt = gr.Textbox(label="System prompt (optional)", lines=2)
            sampling = sampling_controls(app.reply_room)
        sent = message.submit(
            add_user_message, [message, chatbot], [message, chatbot], queue=False, api_visibility="private"
        )
        answering = sent.then(
            app.respond,
            [chatbot, system_prompt, *sampling],
            chatbot,
            api_visibility="private",
            concurrency_limit=app.max_batch_size,
            **GENERATE,
        )
        stop.click(None, cancels=[answering], api_visibility="private")
        clear.click(None, cancels=[answering], api_visibility="private")
        gr.api(app.chat, api_name="chat", concurrency_limit=app.max_batch_size, **GENERATE)


def ask_tab(app: DemoApp) -> None:
    """A question answered from the index's passages with citations; the passages in the prompt as a table."""
    with gr.Tab("Ask the docs", id="ask-docs"):
        question = gr.Textbox(
            label=f"Question (answered from {len(app.rag_index)} indexed passages)",
            placeholder="How do I parse JSON text?",
            submit_btn="Ask",
            elem_id="rag-question",
        )
        with gr.Row():
            k = gr.Slider(1, 10, value=4, step=1, precision=0, label="passages retrieved (k)")
            mode = gr.Radio(list(SEARCH_MODES), value="hybrid", label="retrieval")
            room = app.reply_room
            tokens = gr.Slider(
                1, room, value=min(64, room), step=1, precision=0, label="max new tokens", elem_id="rag-max-tokens"
            )
        answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="rag-answer")
        passages = gr.Dataframe(
            headers=PASSAGE_COLUMNS,
            datatype=["number", "str", "number", "str", "str"],
            label="Passages in the prompt (cited ✓ = the answer names it as [n])",
            interactive=False,
            wrap=True,
            elem_id="rag-passages",
        )
        question.submit(
            app.ask,
            [question, k, mode, tokens],
            [passages, answer],
            api_name="ask",
            concurrency_limit=app.max_batch_size,
            **GENERATE,
        )


def tokenizer_tab(app: DemoApp, demo: gr.Blocks) -> None:
    """The text cut into tokens, each labelled with its id, and the counts; updated as the text changes."""
    with gr.Tab("Tokenizer", id="tokenizer"):
        text = gr.Textbox(
            label="Text",
            lines=4,
            value="The json module encodes Python objects as JSON text.",
            elem_id="tokenizer-input",
        )
        counts = gr.Markdown(elem_id="tokenizer-counts")
        tokens = gr.HighlightedText(
            label="Tokens (each labelled with its id)", show_legend=False, elem_id="tokenizer-tokens"
        )
        text.change(app.tokenize, text, [tokens, counts], api_name="tokenize")
        demo.load(app.tokenize, text, [tokens, counts], api_visibility="private")


def attention_tab(app: DemoApp) -> None:
    """One head's attention over a prompt as a heatmap."""
    config = app.engine.config
    with gr.Tab("Attention", id="attention"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="To open a file, use the built-in open", scale=3)
            layer = gr.Slider(0, config.num_hidden_layers - 1, value=0, step=1, precision=0, label="layer")
            head = gr.Slider(0, config.num_attention_heads - 1, value=0, step=1, precision=0, label="head")
        show = gr.Button("Show attention", variant="primary")
        heatmap = gr.Plot(label=f"attention (first {ATTENTION_MAX_TOKENS} tokens)", format="png")
        show.click(app.attention, [prompt, layer, head], heatmap, api_name="attention")


def model_card_tab(app: DemoApp) -> None:
    """The model's size and shape, the run's training curves and summary, and its config."""
    with gr.Tab("Model card", id="model-card"):
        gr.Markdown(model_summary(app.engine, app.model))
        curve, summary = (find_run_file(app.run_dirs, name) for name in RUN_FILES)
        if curve is not None:
            gr.Image(str(curve), label="training curves", interactive=False)
        if summary is not None:
            with gr.Accordion("Run summary (summary.md)", open=True):
                gr.Markdown(summary.read_text(encoding="utf-8"))
        if curve is None and summary is None:
            gr.Markdown("*No `loss_curve.png` or `summary.md` beside this model (training runs have them).*")
        gr.JSON(json.loads(app.engine.config.to_json_string()), label="config.json", open=True)


def build_demo(
    model: str,
    *,
    device: str | None = None,
    max_seq_len: int | None = None,
    trust_remote_code: bool = False,
    max_batch_size: int = 8,
    rag_index=None,
) -> tuple[gr.Blocks, EngineLoop]:
    """Load `model` into an engine, start its loop, and build the app around it.

    Args:
        model: A run folder (its `model/` is loaded), a model folder or a Hub id.
        device: "cpu", "cuda", ...; default: cuda when available.
        max_seq_len: The context window; default: the model's `max_position_embeddings`.
        trust_remote_code: Allow a folder's own modeling code (an exported model without tiny_hf installed).
        max_batch_size: Chat replies generated together (the engine's cache slots); more wait in Gradio's queue.
        rag_index: A `rag.index.RagIndex`: adds the Ask the docs tab (`main` loads it from --rag-index).

    Returns:
        The Blocks (not launched) and the running EngineLoop: the caller launches the one and, once the app is
        closed, shuts down the other (`loop.shutdown()`); `main` does both.

    Raises:
        FileNotFoundError / OSError / TypeError: see `app.launch.load_engine`.
    """
    engine, run_dirs = load_engine(
        model,
        device=device,
        max_seq_len=max_seq_len,
        trust_remote_code=trust_remote_code,
        max_batch_size=max_batch_size,
        window_policy="reject",  # chat prompts are fitted here, turn by turn, before they reach the engine
    )
    app = DemoApp(EngineLoop(engine).start(), model, run_dirs, rag_index, max_batch_size)
    with gr.Blocks(title=f"tiny-hf · {model}") as demo:
        gr.Markdown(f"## tiny-hf demo · `{model}`")
        with gr.Tabs():
            chat_tab(app)
            if rag_index is not None:
                ask_tab(app)
            tokenizer_tab(app, demo)
            attention_tab(app)
            model_card_tab(app)
    return demo, app.loop


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DemoOptions:
    _argument_group_name = "server"

    host: str = field(default="127.0.0.1", metadata={"help": "0.0.0.0 makes the demo reachable from other machines"})
    port: int = 7860
    no_browser: bool = field(default=False, metadata={"help": "do not open a browser tab"})


def main(argv: list[str] | None = None) -> None:
    model, listen, retrieval = parse_options(
        ModelOptions, DemoOptions, RetrievalOptions, argv=argv, description=__doc__
    )
    rag_index = load_rag_index(retrieval.rag_index) if retrieval.rag_index else None  # before the model: fail fast
    try:
        demo, loop = build_demo(
            model.model,
            device=model.device,
            max_seq_len=model.max_seq_len,
            trust_remote_code=model.trust_remote_code,
            rag_index=rag_index,
        )
    except LOAD_ERRORS as error:
        raise cannot_load(model.model, error) from None
    # `kill` (SIGTERM, what service managers send) stops the demo the way Ctrl-C does, with the cleanup below.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # Blocks until Ctrl-C; then the engine finishes what is running (up to 5 s) and stops.
        demo.launch(server_name=listen.host, server_port=listen.port, inbrowser=not listen.no_browser)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        demo.close()
        loop.shutdown(timeout=5)


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
