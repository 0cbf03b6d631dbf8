"""Grounded generation: retrieve passages, put them into a chat prompt with numbered citations, generate, cite.

The prompt is a system message (answer from the passages, cite them as [1], [2]) and a user message holding the
passages, best first, numbered [1] ... [n], then the question. It must fit the generator's window minus the tokens
kept for the answer (`max_new_tokens`): the question and the instructions always stay; passages are dropped from the
lowest-ranked up until the prompt fits (a passage is never cut: half a passage can say the opposite of the whole).
A question that does not fit even without passages is an error, not a silent truncation.

`answer` runs the three steps: `grounded_prompt` (retrieve and fit: the prompt ids, the numbered `Source`s it
holds, how many were dropped), generation, and `cite` (the generated text and those sources into an `Answer`). It
generates greedily with `tiny_hf.chat.chat_generate` (the engine for TinyForCausalLM-style models, `generate()` for
any other Hugging Face causal LM; `answer_all` batches many questions); the server and the web demo (app/) call
`grounded_prompt` and `cite` around their own running EngineLoop instead. The answer comes back with the passages the
prompt held (`sources`: document id, character offsets, score) and those the text cites (`citations`: every [n] in
the answer that names one of them).

`measure_answers` compares answer quality with and without retrieval on held-out questions (rag.evaluate's query
set: the reference is the qualified name for a docstring question, the sentence for a topic one), by exact match
and ROUGE-L from the local evaluate metric tiny_hf/metrics/rouge_l.py, and per question (for intervals): ROUGE-L F1
and whether the answer names the documented object (`names_the_object`).

CLI: `tiny-hf ask --index DIR --model runs/demo "How do I serialize an object to JSON?"`;
`tiny-hf ask --index DIR --model runs/demo --measure 20` for the with/without comparison.
"""

from __future__ import annotations

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


def generate_answers(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int) -> list[str]:
    """Greedy answers to fitted prompt ids, one per prompt, by `tiny_hf.chat.chat_generate` (the engine for a
    TinyForCausalLM-style model, `generate()` for any other causal LM); each stops at the end of its turn."""
    from tiny_hf.chat import chat_generate

    return [r.text for r in chat_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]


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
        raise ValueError("the index is empty: add documents (tiny-hf index) before asking it")
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


def answer_all(
    questions: Sequence[str],
    index,
    model,
    tokenizer,
    *,
    k: int = 4,
    mode: str = "hybrid",
    max_new_tokens: int = 64,
    system: str | None = DEFAULT_SYSTEM,
) -> list[Answer]:
    """`answer` for many questions, generated together (one batch on the engine, or on `generate()`)."""
    window = context_window(model)
    prompts = [
        grounded_prompt(
            q, index, tokenizer, window=window, k=k, mode=mode, max_new_tokens=max_new_tokens, system=system
        )
        for q in questions
    ]
    texts = generate_answers(model, tokenizer, [ids for ids, _, _ in prompts], max_new_tokens=max_new_tokens)
    return [
        cite(text, sources, prompt_tokens=len(ids), dropped=dropped)
        for text, (ids, sources, dropped) in zip(texts, prompts, strict=True)
    ]


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
        model: a causal LM (a TinyForCausalLM-style one runs on the engine, any other on `generate()`), in eval mode.
        tokenizer: its tokenizer.
        k: passages retrieved (fewer may fit the prompt).
        mode: "bm25", "dense" or "hybrid".
        max_new_tokens: tokens kept for the answer; the prompt gets the window minus these.
        system: the system message.
    """
    (result,) = answer_all(
        [question], index, model, tokenizer, k=k, mode=mode, max_new_tokens=max_new_tokens, system=system
    )
    return result


def answers_without_retrieval(questions: Sequence[str], model, tokenizer, *, max_new_tokens: int = 64) -> list[Answer]:
    """The same generator on each question alone (the closed-book baseline of `measure_answers`)."""
    budget = context_window(model) - max_new_tokens
    prompts = [build_prompt(q, [], tokenizer, budget=budget, system=NO_CONTEXT_SYSTEM)[0] for q in questions]
    texts = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [Answer(text, [], [], len(ids), 0) for text, ids in zip(texts, prompts, strict=True)]


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
        questions whose relevant chunk made it into the prompt, "examples": the first three answers,
        "per_question": each question's answers, ROUGE-L F1 with and without, whether its relevant chunk was in
        the prompt, and whether each answer names the object (`names_the_object`)}.
    """
    if not queries:
        raise ValueError("no questions to measure")
    metric = load_rouge_l()
    refs, questions = [q.answer for q in queries], [q.text for q in queries]
    grounded = answer_all(questions, index, model, tokenizer, k=k, mode=mode, max_new_tokens=max_new_tokens)
    closed = answers_without_retrieval(questions, model, tokenizer, max_new_tokens=max_new_tokens)
    found = [any(s.chunk_index in q.relevant for s in a.sources) for q, a in zip(queries, grounded, strict=True)]
    per_question = [
        {
            "question": q.text,
            "kind": getattr(q, "source", None),
            "reference": q.answer,
            "with": g.text,
            "without": c.text,
            "relevant_in_prompt": f,
            "rougeL_f1_with": metric.compute(predictions=[g.text], references=[q.answer])["rougeL_f1"],
            "rougeL_f1_without": metric.compute(predictions=[c.text], references=[q.answer])["rougeL_f1"],
            "names_with": names_the_object(g.text, q.answer),
            "names_without": names_the_object(c.text, q.answer),
        }
        for q, g, c, f in zip(queries, grounded, closed, found, strict=True)
    ]
    return {
        "questions": len(queries),
        "with_retrieval": metric.compute(predictions=[a.text for a in grounded], references=refs),
        "without_retrieval": metric.compute(predictions=[a.text for a in closed], references=refs),
        "retrieved_relevant": sum(found) / len(found),
        "examples": [
            {"question": q.text, "reference": q.answer, "with": g.text, "without": c.text}
            for q, g, c in list(zip(queries, grounded, closed, strict=True))[:3]
        ],
        "per_question": per_question,
    }


_QUALNAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def names_the_object(text: str, reference: str) -> bool | None:
    """Whether an answer names the documented object of a docstring question: the last part of its qualified name
    (`dumps` for `json.dumps`) as a whole word, case as written. None when the reference is not a qualified name
    (a topic question's reference is a sentence)."""
    if not _QUALNAME.fullmatch(reference):
        return None
    name = reference.rsplit(".", 1)[-1]
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def load_generator(name: str, *, device: str = "cpu"):
    """A causal LM and its tokenizer from a run folder (its model/), a model folder or a Hub id; one that cannot be
    loaded exits with a one-line error naming --model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tiny_hf  # noqa: F401  (registers the "tiny" model type)
    from tiny_hf.runs import resolve_model

    try:
        path, _ = resolve_model(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        return model, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"error: cannot load --model {name!r}: {reason}") from None


@dataclass
class AnswerOptions:
    # ---- index and generator ----
    index: str = field(metadata={"help": "an index folder written by `tiny-hf index`"})
    model: str = field(metadata={"help": "a run folder, model folder or Hub id of a causal LM"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    # ---- retrieval and generation ----
    top_k: int = field(default=4, metadata={"help": "passages retrieved", "aliases": ["-k"]})
    mode: str = field(default="hybrid", metadata={"help": "retriever", "choices": ["bm25", "dense", "hybrid"]})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens kept for the answer"})
    # ---- measurement ----
    measure: int = field(default=0, metadata={"help": "with vs without retrieval on N questions", "metavar": "N"})
    # ---- output ----
    json: bool = field(default=False, metadata={"help": "print JSON"})


def print_answer(result: Answer) -> None:
    """The answer, then every passage of its prompt (a * marks the ones it cites)."""
    print(result.text or "(empty answer)")
    print(f"\nsources ({result.prompt_tokens} prompt tokens, {result.dropped} passage(s) dropped to fit):")
    for s in result.sources:
        mark = "*" if s in result.citations else " "
        print(f"{mark}[{s.number}] {s.doc_id} [{s.start}:{s.end}]")


def main(argv: list[str] | None = None) -> dict:
    from .index import load_rag_index
    from .search import parse_with_positional

    options, question = parse_with_positional(
        AnswerOptions,
        argv,
        name="question",
        help="the question (omit with --measure)",
        optional=True,
        description=__doc__,
    )
    if not options.measure and not question:
        raise SystemExit("error: give a question, or --measure N")
    index = load_rag_index(options.index, flag="--index")
    model, tokenizer = load_generator(options.model, device=options.device)
    settings = {"k": options.top_k, "mode": options.mode, "max_new_tokens": options.max_new_tokens}
    if options.measure:
        from .evaluate import build_queries

        result = measure_answers(build_queries(index.chunks, n=options.measure), index, model, tokenizer, **settings)
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return result
    result = answer(question, index, model, tokenizer, **settings)
    if options.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print_answer(result)
    return result.to_dict()


if __name__ == "__main__":
    from tiny_hf.cli import run_main

    run_main(main)
