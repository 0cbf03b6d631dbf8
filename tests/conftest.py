"""Shared test setup: offline, no telemetry, deterministic, and small helpers used across test files."""

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

# Set before transformers/huggingface_hub/gradio are imported by any test module: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
for _remote in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):  # trackio logs locally only (see _trackio_dir)
    os.environ.pop(_remote, None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _trackio_dir(tmp_path_factory):
    """trackio's database in a temporary folder, not ~/.cache/huggingface/trackio. trackio reads TRACKIO_DIR once,
    when it is first imported (by a test, never at collection), so the whole session shares this one."""
    os.environ["TRACKIO_DIR"] = str(tmp_path_factory.mktemp("trackio"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_config(**overrides):
    """The tester's config (transformers' habit): vocab 99, hidden 32, 2 layers, 4 heads; overrides win."""
    from tiny_hf import TinyConfig

    fields = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
    )
    return TinyConfig(**{**fields, **overrides})


def random_llama(**overrides):
    """A random transformers LlamaForCausalLM of the tester's size (vocab 99, hidden 32, 2 layers, 4 heads), in eval
    mode; overrides win."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    """step -> value of the scalar `tag` in the TensorBoard event files of `folder`, read with TensorBoard's own
    reader (which hides the events a resumed run purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def trackio_logs(run: str) -> list[dict]:
    """The records trackio stored for `run` in the project every stage logs to, read from its local database."""
    from trackio.sqlite_storage import SQLiteStorage

    from training.trackers import PROJECT

    return SQLiteStorage.get_logs(PROJECT, run)


def trackio_config(run: str) -> dict:
    """The config trackio stored with `run` (the project every stage logs to)."""
    from trackio.sqlite_storage import SQLiteStorage

    from training.trackers import PROJECT

    return SQLiteStorage.get_run_config(PROJECT, run) or {}


@pytest.fixture
def one_torch_thread():
    """The tiny models' ops are microseconds long: with 2 threads on 2 busy cores each op waits for the other
    thread, which makes the engine ~20x slower. One thread keeps a file fast; the setting is restored. A test file
    opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every address a socket tries to connect to during the test (the test asserts it stays empty: offline)."""
    tried = []
    connect = socket.socket.connect

    def record(self, address):
        tried.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", record)
    return tried


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for servers and process groups started in tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_without_tiny_hf(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter in which `import tiny_hf` fails, offline, with an empty modules cache: only
    a folder's own source files can make its model load (what a user without tiny_hf gets)."""
    blocker = "import sys; sys.modules['tiny_hf'] = None  # importing tiny_hf now raises ImportError\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved TinyForCausalLM (random weights, 256 positions) + a 320-token BPE tokenizer trained on the pydoc topics:
    what the inference engine, the server and the Gradio demo load. The head is rescaled so that greedy choices are
    clear-cut (no near-ties for batching to flip)."""
    from tiny_hf import TinyForCausalLM
    from tiny_hf.bpe import train_tokenizer
    from tiny_hf.corpus import topic_documents

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = train_tokenizer([d["text"] for d in topic_documents()[:40]], vocab_size=320, model_max_length=256)
    torch.manual_seed(0)
    model = TinyForCausalLM(
        tiny_config(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False)
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def stock_llama_dir(tiny_lm_dir, tmp_path):
    """A random 2-layer transformers LlamaForCausalLM (GQA) with tiny_lm_dir's tokenizer: a stock architecture for
    the stages that must run on any Hugging Face causal LM."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_run_dir(tiny_lm_dir, tmp_path):
    """A pretraining run folder without the training (what compression scripts take as --model): `tiny_lm_dir` as
    model/ and a run_config.json whose data is a small local corpus with a 20% validation split."""
    return make_run_dir(tiny_lm_dir, tmp_path)


def make_run_dir(model_dir: Path, tmp_path: Path, block_size: int = 32) -> Path:
    """`tmp_path/run`: `model_dir` copied as model/, and a run_config.json over 60 pydoc topics (20% held out)."""
    from tiny_hf.corpus import DOC_SEPARATOR, topic_documents

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for file in model_dir.iterdir():
        (run / "model" / file.name).write_bytes(file.read_bytes())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(DOC_SEPARATOR.join(d["text"] for d in topic_documents()[:60]))
    config = {"data": str(corpus), "block_size": block_size, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")}
    (run / "run_config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="session")
def small_stdlib(tmp_path_factory) -> Path:
    """A handful of real standard-library modules, so the data builds in a second."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("stdlib")
    for name in ("json", "email", "logging", "asyncio", "http", "concurrent"):
        shutil.copytree(stdlib / name, root / name)
    for name in ("textwrap.py", "shutil.py", "pathlib.py", "argparse.py", "csv.py", "heapq.py", "bisect.py"):
        if (stdlib / name).exists():
            shutil.copy(stdlib / name, root / name)
    return root


# Grounded answers (app/server.py's /v1/rag/answer, app/demo.py's "Ask the docs" tab): five short documents.
RAG_DOCS = [
    {
        "id": "json",
        "text": "The json module encodes Python objects as JSON text. json.dumps returns a string, and "
        "json.loads parses JSON text back into Python objects.",
    },
    {
        "id": "csv",
        "text": "The csv module reads and writes comma separated values. csv.reader yields the rows of a "
        "file as lists of strings.",
    },
    {
        "id": "pathlib",
        "text": "The pathlib module has Path objects for file system paths. Path.read_text returns the "
        "contents of a file as a string.",
    },
    {"id": "re", "text": "The re module matches regular expressions. re.search finds the first match of a pattern."},
    {
        "id": "heapq",
        "text": "The heapq module keeps a list as a priority queue: heappush adds, heappop takes the smallest item.",
    },
]
RAG_QUESTION = "How does json.loads parse JSON text?"


@pytest.fixture(scope="session")
def rag_index_dir(tiny_lm_dir, tmp_path_factory):
    """RAG_DOCS embedded by the tiny model (fast), in an index folder as `python -m rag.index` writes it. The chunks
    are short: the tiny tokenizer spends ~195 of the 256-token window on the instructions and the question."""
    from rag import Encoder, RagIndex

    index = RagIndex(Encoder(str(tiny_lm_dir)), chunk_size=12, overlap=2)
    index.add(RAG_DOCS)
    return index.save(tmp_path_factory.mktemp("rag") / "index")


@pytest.fixture(scope="module")
def rag_index(rag_index_dir):
    """The index loaded back as the scripts' --rag-index does."""
    from rag.index import load_rag_index

    return load_rag_index(str(rag_index_dir))


def check_stage_record(out: Path, stage: str, model_dir: str = "model", base_run: Path | None = None):
    """What every stage leaves (training/model_card.py): run_config.json naming the stage, and a model card with the
    Hub's metadata in the model folder, loaded with huggingface_hub's own parser. Returns (run_config, card)."""
    from huggingface_hub import ModelCard

    config = json.loads((out / "run_config.json").read_text())
    assert config["stage"] == stage
    if base_run is not None:
        assert Path(config["base_run"]) == base_run
    card = ModelCard.load(out / model_dir / "README.md")
    assert card.data.library_name in ("transformers", "peft") and card.data.pipeline_tag
    assert "tiny-hf" in card.data.tags and stage in card.data.tags
    assert "## Usage" in card.text and "## Training" in card.text and str(out.parent) not in card.text
    return config, card
