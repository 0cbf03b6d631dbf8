"""Grounded generation: retrieve passages, put them into a chat prompt with numbered citations, generate, cite.

The prompt is a system message (answer from the passages, cite them as [1], [2]) and a user message holding the
passages, best first, numbered [1] ... [n], then the question. It must fit the generator's window minus the tokens
kept for the answer (`max_new_tokens`): the question and the instructions always stay; passages are dropped from the
lowest-ranked up until the prompt fits (a passage is never cut: half a passage can say the opposite of the whole).
A question that does not fit even without passages is an error, not a silent truncation.

`answer` runs the three steps: `grounded_prompt` (retrieve and fit: the prompt ids, the numbered `Source`s it
holds, how many were dropped), generation, and `cite` (the generated text and those sources into an `Answer`). It
generates on a new `tiny_hf.engine.Engine` per call (greedy, window_policy="reject": the prompt was fitted already)
for TinyForCausalLM-style models, and on `model.generate` for any other Hugging Face causal LM; the server and the
web demo (app/) call `grounded_prompt` and `cite` around their own running EngineLoop instead. The answer comes
back with the passages the prompt held (`sources`: document id, character offsets, score) and those the text cites
(`citations`: every [n] in the answer that names one of them).

`measure_answers` compares answer quality with and without retrieval on held-out questions (rag.evaluate's query
set: the reference is the qualified name for a docstring question, the sentence for a topic one), by exact match
and ROUGE-L from the local evaluate metric tiny_hf/metrics/rouge_l.py.

CLI: `python -m rag.answer --index DIR --model runs/demo "How do I serialize an object to JSON?"`;
`python -m rag.answer --index DIR --model runs/demo --measure 20` for the with/without comparison.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from tiny_hf.metrics import load_rouge_l

DEFAULT_SYSTEM = (
    "Answer the question using only the numbered passages. Cite each passage you use by its number, like [1] or "
    "[2]. If the passages do not hold the answer, say that you do not know."
)
NO_CONTEXT_SYSTEM = "Answer the question briefly."
_CITATION = re.compile(r"\[(\d+)\]")


class QuestionTooLongError(ValueError):
    """The question (with the instructions) does not fit the prompt budget even without any passage."""


@dataclass
class Source:
    """A passage of the prompt: its number in the prompt and where it comes from."""

    number: int
    doc_id: str
    start: int
    end: int
    chunk_index: int
    score: float
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    """A generated answer with its grounding.

    Args:
        text: the generated text.
        citations: the sources the text cites ([n] markers naming a passage of the prompt), in order of first mention.
        sources: every passage the prompt held, numbered as in the prompt.
        prompt_tokens: length of the prompt.
        dropped: retrieved passages left out because they did not fit the budget.
    """

    text: str
    citations: list[Source] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    prompt_tokens: int = 0
    dropped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def context_window(model) -> int:
    """The model's window in tokens (max_position_embeddings, or GPT-2's n_positions)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot tell the context window of {type(model).__name__}: its config has no max_position_*")


def _user_message(question: str, passages: Sequence) -> str:
    if not passages:
        return f"Question: {question}"
    blocks = [f"[{i}] ({p.doc_id})\n{p.text}" for i, p in enumerate(passages, start=1)]
    return "Passages:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"


def _encode(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    # no chat template (a base LM): plain text turns, ending where the answer starts
    text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
    return tokenizer(text, add_special_tokens=False).input_ids


def build_prompt(
    question: str,
    passages: Sequence,
    tokenizer,
    *,
    budget: int,
    system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[int], int]:
    """Chat-prompt ids holding the question and as many of the best passages as fit `budget` tokens.

    Args:
        question: the question (never cut).
        passages: hits, best first (anything with doc_id and text, e.g. `rag.index.Hit`).
        tokenizer: the generator's tokenizer (its chat template if it has one).
        budget: most prompt tokens (the window minus the answer's tokens).
        system: the system message; None for none.

    Returns:
        The prompt ids and how many passages fit (the first ones; the rest were dropped).

    Raises:
        ValueError: an empty question; QuestionTooLongError (a ValueError) for one that does not fit the budget even
            without passages.
    """
    if not question.strip():
        raise ValueError("the question is empty")
    if budget < 1:
        raise ValueError(f"budget={budget} must be >= 1 token")

    def encode(n: int) -> list[int]:
        messages = [{"role": "system", "content": system}] if system else []
        return _encode(tokenizer, messages + [{"role": "user", "content": _user_message(question, passages[:n])}])

    bare = encode(0)
    if len(bare) > budget:
        raise QuestionTooLongError(
            f"the question takes {len(bare)} prompt tokens without any passage, over the budget of {budget} (the "
            f"window minus the answer's tokens); shorten the question or lower max_new_tokens"
        )
    # Drop from the lowest-ranked passage up; a prompt's length grows with n, so the first n that fits is the largest.
    n = len(passages)
    ids = encode(n)
    while n > 0 and len(ids) > budget:
        n -= 1
        ids = encode(n) if n else bare
    return ids, n


def _uses_engine(model) -> bool:
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("embed_tokens", "add_positions", "layers", "norm")) and hasattr(
        model, "lm_head"
    )


@torch.no_grad()
def generate_text(model, tokenizer, ids: list[int], *, max_new_tokens: int, window: int) -> str:
    """Greedy continuation of `ids`: the from-scratch Engine for TinyForCausalLM, `model.generate` otherwise."""
    stop_ids = [t for t in (tokenizer.convert_tokens_to_ids("<|im_end|>"),) if isinstance(t, int) and t >= 0]
    stop_ids = [t for t in stop_ids if t != tokenizer.unk_token_id]
    if _uses_engine(model):
        from tiny_hf.engine import Engine, SamplingParams

        engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=window, prefix_cache_tokens=0)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop_token_ids=stop_ids)
        return engine.generate([ids], params)[0].text.strip()
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=[t for t in [tokenizer.eos_token_id, *stop_ids] if t is not None] or None,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def _source(number: int, hit) -> Source:
    return Source(number, hit.doc_id, hit.start, hit.end, hit.chunk_index, hit.score, hit.text)


def grounded_prompt(
    question: str,
    index,
    tokenizer,
    *,
    window: int,
    k: int = 4,
    mode: str = "hybrid",
    max_new_tokens: int = 64,
    system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[int], list[Source], int]:
    """Retrieve the top k passages for `question` and fit as many as the window allows into a chat prompt.

    Args:
        question: the question.
        index: a `rag.index.RagIndex`.
        tokenizer: the generator's tokenizer.
        window: the generator's context window in tokens (`context_window(model)`, or an engine's max_seq_len).
        k: passages retrieved (fewer may fit the prompt).
        mode: "bm25", "dense" or "hybrid".
        max_new_tokens: tokens kept for the answer; the prompt gets the window minus these.
        system: the system message.

    Returns:
        The prompt ids, the passages it holds as `Source`s numbered as in the prompt, and how many retrieved
        passages were dropped to fit.

    Raises:
        ValueError: k < 1, an empty index, no room for a prompt, an empty question, an unknown mode, or a question
            that does not fit even without passages (`QuestionTooLongError`).
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1 passage")
    if len(index) == 0:
        raise ValueError("the index is empty: add documents (python -m rag.index) before asking it")
    budget = window - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the {window}-token window")
    if not question.strip():
        raise ValueError("the question is empty")
    hits = index.search(question, k=k, mode=mode)
    ids, n = build_prompt(question, hits, tokenizer, budget=budget, system=system)
    return ids, [_source(i, h) for i, h in enumerate(hits[:n], start=1)], len(hits) - n


def cite(text: str, sources: Sequence[Source], *, prompt_tokens: int = 0, dropped: int = 0) -> Answer:
    """The `Answer` for generated `text`: its citations are the sources its [n] markers name, in order of first
    mention (a number that names no source is ignored)."""
    sources = list(sources)
    cited = dict.fromkeys(int(m) for m in _CITATION.findall(text))
    citations = [sources[c - 1] for c in cited if 1 <= c <= len(sources)]
    return Answer(text, citations, sources, prompt_tokens, dropped)


def answer(
    question: str,
    index,
    model,
    tokenizer,
    *,
    k: int = 4,
    mode: str = "hybrid",
    max_new_tokens: int = 64,
    system: str | None = DEFAULT_SYSTEM,
) -> Answer:
    """Retrieve the top k passages for `question`, fit them into a prompt, generate, and return the cited sources.

    Args:
        question: the question.
        index: a `rag.index.RagIndex`.
        model: a causal LM (TinyForCausalLM runs on the Engine; any other on `generate`), in eval mode.
        tokenizer: its tokenizer.
        k: passages retrieved (fewer may fit the prompt).
        mode: "bm25", "dense" or "hybrid".
        max_new_tokens: tokens kept for the answer; the prompt gets the window minus these.
        system: the system message.
    """
    window = context_window(model)
    ids, sources, dropped = grounded_prompt(
        question, index, tokenizer, window=window, k=k, mode=mode, max_new_tokens=max_new_tokens, system=system
    )
    text = generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, window=window)
    return cite(text, sources, prompt_tokens=len(ids), dropped=dropped)


def answer_without_retrieval(question: str, model, tokenizer, *, max_new_tokens: int = 64) -> Answer:
    """The same generator on the question alone (the closed-book baseline of `measure_answers`)."""
    window = context_window(model)
    ids, _ = build_prompt(question, [], tokenizer, budget=window - max_new_tokens, system=NO_CONTEXT_SYSTEM)
    text = generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, window=window)
    return Answer(text, [], [], len(ids), 0)


def measure_answers(
    queries: Sequence,
    index,
    model,
    tokenizer,
    *,
    k: int = 4,
    mode: str = "hybrid",
    max_new_tokens: int = 32,
) -> dict:
    """Answer quality with vs without retrieval: exact match and ROUGE-L against each query's reference.

    Args:
        queries: `rag.evaluate.Query` objects (their `text` is asked, their `answer` is the reference).
        index, model, tokenizer, k, mode, max_new_tokens: as for `answer`.

    Returns:
        {"with_retrieval": metrics, "without_retrieval": metrics, "questions": n, "retrieved_relevant": share of
        questions whose relevant chunk made it into the prompt, "examples": the first three answers}.
    """
    if not queries:
        raise ValueError("no questions to measure")
    metric = load_rouge_l()
    refs = [q.answer for q in queries]
    grounded = [
        answer(q.text, index, model, tokenizer, k=k, mode=mode, max_new_tokens=max_new_tokens) for q in queries
    ]
    closed = [answer_without_retrieval(q.text, model, tokenizer, max_new_tokens=max_new_tokens) for q in queries]
    found = [any(s.chunk_index in q.relevant for s in a.sources) for q, a in zip(queries, grounded, strict=True)]
    return {
        "questions": len(queries),
        "with_retrieval": metric.compute(predictions=[a.text for a in grounded], references=refs),
        "without_retrieval": metric.compute(predictions=[a.text for a in closed], references=refs),
        "retrieved_relevant": sum(found) / len(found),
        "examples": [
            {"question": q.text, "reference": q.answer, "with": g.text, "without": c.text}
            for q, g, c in list(zip(queries, grounded, closed, strict=True))[:3]
        ],
    }


def load_generator(name: str, *, device: str = "cpu"):
    """A causal LM and its tokenizer from a run folder (its model/), a model folder or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tiny_hf  # noqa: F401  (registers the "tiny" model type)
    from tiny_hf.runs import resolve_model

    path, _ = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # ---- index and generator ----
    io = parser.add_argument_group("index and generator")
    io.add_argument("--index", required=True, help="an index folder written by `python -m rag.index`")
    io.add_argument("--model", required=True, help="a run folder, model folder or Hub id of a causal LM")
    io.add_argument("--device", default="cpu", help="cpu or cuda")
    io.add_argument("question", nargs="?", default=None, help="the question (omit with --measure)")
    # ---- retrieval and generation ----
    gen = parser.add_argument_group("retrieval and generation")
    gen.add_argument("-k", "--top-k", dest="k", type=int, default=4, help="passages retrieved")
    gen.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"], help="retriever")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens kept for the answer")
    # ---- measurement ----
    meas = parser.add_argument_group("measurement")
    meas.add_argument("--measure", type=int, default=0, metavar="N", help="with vs without retrieval on N questions")
    # ---- output ----
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if not args.measure and not args.question:
        parser.error("give a question, or --measure N")

    from .index import RagIndex

    index = RagIndex.load(args.index)
    model, tokenizer = load_generator(args.model, device=args.device)
    if args.measure:
        from .evaluate import build_queries

        queries = build_queries(index.chunks, n=args.measure)
        result = measure_answers(
            queries, index, model, tokenizer, k=args.k, mode=args.mode, max_new_tokens=args.max_new_tokens
        )
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return result
    result = answer(
        args.question, index, model, tokenizer, k=args.k, mode=args.mode, max_new_tokens=args.max_new_tokens
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(result.text or "(empty answer)")
        print(f"\nsources ({result.prompt_tokens} prompt tokens, {result.dropped} passage(s) dropped to fit):")
        for s in result.sources:
            mark = "*" if s in result.citations else " "
            print(f"{mark}[{s.number}] {s.doc_id} [{s.start}:{s.end}]")
    return result.to_dict()


if __name__ == "__main__":
    main()
