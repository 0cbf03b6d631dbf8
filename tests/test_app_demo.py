"""The Gradio demo (app/demo.py), served for real on a loopback port: its API through gradio_client, its page in
Debian's chromium through Playwright. The model is the random tiny LM of `tiny_lm_dir`, inside a run folder with a
summary and a loss curve, and a five-document retrieval index goes with it, so every tab has something to show."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import RAG_QUESTION, free_port
from gradio_client import Client
from gradio_client.exceptions import AppError

from app import server
from app.demo import PASSAGE_COLUMNS, attention_map, build_demo, main, token_spans
from tiny_hf.chat import CHAT_SAMPLING
from tiny_hf.runs import FETCHED_MODELS, model_path, resolve_model

# One worker serves the whole module (under `pytest -n 2 --dist loadgroup`), so the app starts once.
pytestmark = pytest.mark.xdist_group("gradio")

CHROMIUM = Path("/usr/bin/chromium")
# The flags that work for Debian's chromium under Playwright here (/work/shared/FACTS.md).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHAT_RUN = ROOT / "runs" / "chat"  # what `make chat` fine-tunes the demo model into
CHAT_QUESTION = "What does `ast.parse` do?"  # the ast module is held out of SFT (and of pretraining)
TRICKY_TEXT = "The json module: héllo wörld 🙂\n\n  tabs\tand <|im_end|> special."
# Greedy, so that a reply is the same on every run; short, so that the file stays fast.
GREEDY = dict(system_prompt="", temperature=0.0, top_p=1.0, top_k=0, max_tokens=24, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def run_dir(tiny_lm_dir, tmp_path_factory):
    """A run folder as training/pretrain.py leaves it: model/ plus summary.md and loss_curve.png beside it."""
    from matplotlib.figure import Figure

    run = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_lm_dir, run / "model")
    (run / "summary.md").write_text("# Run summary\n\nfinal validation loss 9.87\n", encoding="utf-8")
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([3.0, 2.0, 1.5])
    fig.savefig(run / "loss_curve.png")
    return run


def launched(demo, loop):
    """Serve a built app on a free local port for a fixture's lifetime: (url, engine), then close both."""
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield SimpleNamespace(url=url, engine=loop.engine)
    finally:
        demo.close()
        loop.shutdown(timeout=5)


@pytest.fixture(scope="module")
def served(run_dir, rag_index):
    yield from launched(*build_demo(str(run_dir), rag_index=rag_index))


@pytest.fixture(scope="module")
def client(served):
    return Client(served.url, verbose=False)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and the command line
# ---------------------------------------------------------------------------------------------------------------------
def test_resolve_model_takes_run_folders_model_folders_and_hub_ids(run_dir, tmp_path):
    assert resolve_model(str(run_dir)) == (str(run_dir / "model"), [run_dir])
    assert resolve_model(str(run_dir / "model")) == (str(run_dir / "model"), [run_dir / "model", run_dir])
    with pytest.raises(FileNotFoundError, match="not in the cache .* while offline"):  # conftest: HF_HUB_OFFLINE=1
        resolve_model("someone/tiny-model")
    with pytest.raises(ValueError, match="neither a local folder nor a Hub id"):
        resolve_model("someone/bad name")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model("runs/no/such/run")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))  # a folder, but no model in it


def test_main_says_clearly_when_the_model_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(missing), "--no-browser"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: cannot load --model '{missing}': no such folder")
    assert "Traceback" not in message


@pytest.mark.parametrize("command", [main, server.main], ids=["chat", "serve"])
def test_a_fetched_name_says_how_to_fetch_it_in_one_line(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/smollm2 here
    with pytest.raises(SystemExit) as exit_info:
        command(["--model", "smollm2", "--no-browser"] if command is main else ["--model", "smollm2"])
    message = str(exit_info.value.code)
    assert message == (
        "error: cannot load --model 'smollm2': SmolLM2-135M-Instruct is not fetched (no runs/smollm2/model): "
        "run `tiny-hf fetch smollm2`"
    )


def test_a_fetched_name_loads_its_run_folder_and_a_local_folder_of_that_name_wins(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(FETCHED_MODELS) == {"smollm2"}
    (tmp_path / "runs" / "smollm2").mkdir(parents=True)  # a fetch that never finished: still not fetched
    with pytest.raises(ValueError, match=r"^--model smollm2: .*run `tiny-hf fetch smollm2`$"):
        model_path("--model", "smollm2")
    shutil.copytree(tiny_lm_dir, tmp_path / "runs" / "smollm2" / "model")
    assert resolve_model("smollm2") == ("runs/smollm2/model", [Path("runs/smollm2")])
    assert model_path("--model", "smollm2") == "runs/smollm2/model"
    shutil.copytree(tiny_lm_dir, tmp_path / "smollm2")  # a folder in the working directory is what the user means
    assert resolve_model("smollm2") == ("smollm2", [Path("smollm2"), Path(".")])


def test_main_says_clearly_when_the_rag_index_does_not_exist(run_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(run_dir), "--rag-index", str(tmp_path / "no-index"), "--no-browser"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: cannot load --rag-index '{tmp_path / 'no-index'}': ")
    assert "Traceback" not in message


def test_ask_the_docs_is_there_only_with_an_index(run_dir):
    demo, loop = build_demo(str(run_dir))
    try:
        assert "ask" not in {fn.api_name for fn in demo.fns.values()}
    finally:
        loop.shutdown(timeout=5)


# ---------------------------------------------------------------------------------------------------------------------
# The functions behind the tabs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "plain words", TRICKY_TEXT, "🙂🙂 é", "<|im_start|>user\nhi<|im_end|>"])
def test_token_spans_join_back_into_the_text_and_cover_every_id(served, text):
    tokenizer = served.engine.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    spans = token_spans(tokenizer, ids)
    assert "".join(piece for piece, _ in spans) == text
    assert [i for _, span_ids in spans for i in span_ids] == ids
    assert all(piece for piece, _ in spans)  # a multi-token character is one span, never an empty one


def test_attention_map_is_causal_and_each_row_sums_to_one(served):
    probs, labels = attention_map(served.engine, "To open a file, use open", layer=1, head=2)
    assert probs.shape == (len(labels), len(labels))
    assert probs.sum(-1).tolist() == pytest.approx([1.0] * len(labels), abs=1e-5)
    assert probs.triu(diagonal=1).abs().max().item() == 0.0  # no query sees a later key
    with pytest.raises(ValueError, match="head=4 is not in"):
        attention_map(served.engine, "x", layer=0, head=4)


# ---------------------------------------------------------------------------------------------------------------------
# The API, through gradio_client
# ---------------------------------------------------------------------------------------------------------------------
def test_api_lists_the_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/tokenize", "/attention", "/ask"} <= set(endpoints)


def test_chat_api_streams_a_growing_reply(client):
    history = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]
    job = client.submit("And a dictionary?", history, *GREEDY.values(), api_name="/chat")
    replies = list(job)
    assert replies and replies[-1], "the reply is empty"
    assert all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:], strict=False))
    # The same request again, greedy: the same reply, here with predict().
    assert client.predict("And a dictionary?", history, *GREEDY.values(), api_name="/chat") == replies[-1]


def test_chat_api_refuses_a_message_longer_than_the_context_window(client):
    params = {**GREEDY, "max_tokens": 64}
    with pytest.raises(AppError, match="budget is 192 tokens"):  # 256 positions - 64 for the reply
        client.predict("word " * 400, None, *params.values(), api_name="/chat")


def test_ask_api_streams_the_passages_and_a_grounded_answer(client, rag_index, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rag.answer import answer

    outputs = list(client.submit(RAG_QUESTION, 3, "bm25", 4, api_name="/ask"))
    tables, texts = [o[0] for o in outputs], [o[1] for o in outputs]
    assert tables[-1]["headers"] == PASSAGE_COLUMNS
    rows = tables[-1]["data"]
    # The passages that fit the prompt, best first: the top two of the three retrieved (the third did not fit).
    hits = rag_index.search(RAG_QUESTION, k=3, mode="bm25")
    assert [(row[0], row[1], row[4]) for row in rows] == [(i, h.doc_id, h.text) for i, h in enumerate(hits[:2], 1)]
    assert rows[0][1] == "json" and [row[2] for row in rows] == pytest.approx([h.score for h in hits[:2]], abs=1e-4)
    # The answer is rag.answer's (its own engine, on the same weights), streamed as a growing text.
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    want = answer(
        RAG_QUESTION, rag_index, model, AutoTokenizer.from_pretrained(tiny_lm_dir), k=3, mode="bm25", max_new_tokens=4
    )
    assert texts[0] == "" and texts[-1] == want.text
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    assert [row[0] for row in rows if row[3] == "✓"] == sorted(c.number for c in want.citations)


@pytest.mark.parametrize(
    ("question", "mode", "message"),
    [
        ("  ", "bm25", "the question is empty"),
        ("why " * 400, "bm25", "without any passage"),
        ("json", "fuzzy", "'fuzzy'.*not in the list of choices"),
    ],
)
def test_ask_api_refuses_bad_input_with_a_message(client, question, mode, message):
    with pytest.raises(AppError, match=message):
        client.predict(question, 3, mode, 4, api_name="/ask")


def test_tokenize_api_returns_tokens_that_join_back_into_the_text(client, served):
    spans, counts = client.predict(TRICKY_TEXT, api_name="/tokenize")
    assert "".join(span["token"] for span in spans) == TRICKY_TEXT
    ids = [int(i) for span in spans for i in span["class_or_confidence"].split()]
    assert ids == served.engine.tokenizer(TRICKY_TEXT, add_special_tokens=False).input_ids
    assert f"**{len(ids)}** tokens" in counts and f"**{len(TRICKY_TEXT)}** characters" in counts


def test_attention_api_returns_a_heatmap(client):
    plot = client.predict("To open a file", 0, 0, api_name="/attention")
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/png;base64,")


# ---------------------------------------------------------------------------------------------------------------------
# The page, in a real browser
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make chromium` (apt-get install chromium) for the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (dev extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(20_000)
    # "networkidle" never comes on a Gradio page (it keeps a connection open): wait for elements instead.
    page.goto(served.url, wait_until="domcontentloaded")
    page.wait_for_selector("#chat-input textarea")
    yield page
    page.close()


# Records every text the last assistant message shows, to see the reply arrive in pieces.
WATCH_REPLY = """() => {
    window.replyTexts = [];
    const chatbot = document.querySelector('#chatbot');
    new MutationObserver(() => {
        const bots = chatbot.querySelectorAll('[data-testid=bot]');
        const text = bots.length ? bots[bots.length - 1].textContent : '';
        if (text && window.replyTexts[window.replyTexts.length - 1] !== text) window.replyTexts.push(text);
    }).observe(chatbot, {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.slow
def test_browser_chat_streams_a_reply_into_the_chatbot(page):
    page.get_by_text("System prompt and sampling").click()
    page.fill("#temperature input[type=number]", "0")  # greedy: the same reply on every run
    page.press("#temperature input[type=number]", "Enter")
    page.evaluate(WATCH_REPLY)
    page.fill("#chat-input textarea", "What does the json module do?")
    page.press("#chat-input textarea", "Enter")

    page.wait_for_selector("#chatbot [data-testid=user]:has-text('What does the json module do?')")
    page.wait_for_function("() => window.replyTexts.length > 0")  # the reply has started
    page.wait_for_selector("#chatbot > [data-testid=status-tracker].hide", state="attached")  # ... and ended
    assert page.input_value("#chat-input textarea") == ""  # the message left the box for the chat
    reply = page.locator("#chatbot [data-testid=bot]").last.text_content()
    texts = page.evaluate("() => window.replyTexts")
    assert reply.strip() and texts[-1] == reply
    assert len(texts) > 1, f"the reply arrived in one piece, not streamed: {texts}"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gradio_demo.png"), full_page=True)


@pytest.mark.slow
def test_browser_ask_the_docs_shows_the_passages_and_the_answer(page, client):
    # What the tab's defaults (k=4, hybrid) give with 4 new tokens, through the API: greedy, so the page must agree.
    table, answer = client.predict(RAG_QUESTION, 4, "hybrid", 4, api_name="/ask")
    assert answer and table["data"]
    page.get_by_role("tab", name="Ask the docs").click()
    page.fill("#rag-max-tokens input[type=number]", "4")  # the tiny tokenizer's prompt leaves little room
    page.press("#rag-max-tokens input[type=number]", "Enter")
    page.fill("#rag-question textarea", RAG_QUESTION)
    page.press("#rag-question textarea", "Enter")
    page.wait_for_function("(want) => document.querySelector('#rag-answer textarea').value === want", arg=answer)
    shown = page.locator("#rag-passages").inner_text()
    assert all(column in shown for column in PASSAGE_COLUMNS)
    assert all(row[1] in shown and row[4] in shown for row in table["data"])


@pytest.mark.slow
def test_browser_tokenizer_tab_and_model_card(page):
    page.get_by_role("tab", name="Tokenizer").click()
    text = "héllo 🙂 world"
    page.fill("#tokenizer-input textarea", text)
    page.wait_for_selector("#tokenizer-tokens .text:text-is('🙂')")  # the four bytes of 🙂 make one span
    tokens = page.locator("#tokenizer-tokens .text").all_text_contents()
    assert "".join(tokens) == text
    page.wait_for_selector(f"#tokenizer-counts:has-text('{len(text)} characters')")

    page.get_by_role("tab", name="Model card").click()
    page.wait_for_selector("text=final validation loss 9.87")
    page.wait_for_selector("img[src*='loss_curve']")
    assert page.get_by_text("TinyForCausalLM").first.is_visible()


@pytest.fixture
def chat_served(monkeypatch):
    """The app on `make chat`'s model (runs/chat), when there is one."""
    if not (CHAT_RUN / "model" / "config.json").is_file():
        pytest.skip(f"no {CHAT_RUN}/model: `make chat` fine-tunes the demo model into it")
    monkeypatch.chdir(ROOT)  # the page names the model as `make chat` does: runs/chat
    yield from launched(*build_demo("runs/chat"))


def plain(text: str) -> str:
    """Text as the chatbot shows it, for comparing with the raw reply: Markdown marks and spacing left out."""
    return " ".join(text.translate(str.maketrans("", "", "`*_")).split())


@pytest.mark.slow
def test_browser_the_chat_model_answers_a_held_out_question(browser, chat_served):
    """The SFT'd demo model answers in the chat: the greedy reply appears, ends its turn by itself, and is the
    screenshot in the README (docs/img/chat.png is a copy of test-artifacts/chat.png)."""
    page = browser.new_page(viewport={"width": 960, "height": 760})
    page.set_default_timeout(60_000)
    page.goto(chat_served.url, wait_until="domcontentloaded")
    page.wait_for_selector("#chat-input textarea")
    page.get_by_text("System prompt and sampling").click()
    page.fill("#temperature input[type=number]", "0")  # greedy: the answer the API gives below
    page.press("#temperature input[type=number]", "Enter")
    page.get_by_text("System prompt and sampling").click()  # closed again, for the picture
    page.fill("#chat-input textarea", CHAT_QUESTION)
    page.press("#chat-input textarea", "Enter")
    page.wait_for_selector("#chatbot [data-testid=bot]")
    page.wait_for_selector("#chatbot > [data-testid=status-tracker].hide", state="attached")  # the reply has ended
    shown = page.locator("#chatbot [data-testid=bot]").last.text_content()

    # The same question through the API, greedy with the page's other defaults (max new tokens is 128).
    sampling = {**CHAT_SAMPLING, "temperature": 0.0}
    args = ("", sampling["temperature"], sampling["top_p"], sampling["top_k"], 128, sampling["repetition_penalty"])
    reply = Client(chat_served.url, verbose=False).predict(CHAT_QUESTION, None, *args, api_name="/chat")
    assert plain(reply) and plain(shown) == plain(reply)
    # It ended its turn by itself (before the 128 tokens ran out), and no chat-template markup leaked into it.
    assert len(chat_served.engine.tokenizer(reply).input_ids) < 128 and "<|" not in reply
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat.png"))
    page.close()
