# tiny-hf: `make demo` runs the main job, `make test` the whole suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; any other request downloads a CUDA build.
TORCH  := torch==2.13.0
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup chromium demo chat serve test test-fast lint format bench report clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -e ".[train,finetune,eval,app,dev,rag,llamacpp]"
	rm -f $(VENV)/.installed-*
	touch $@
	@$(MAKE) --no-print-directory chromium

# The browser tests drive Debian's chromium through Playwright (never `playwright install`).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is missing: apt-get install chromium (as root) for the browser tests"

demo: setup
	$(VENV)/bin/tiny-hf demo

# After `make demo`: the Gradio app and the OpenAI-compatible server (127.0.0.1 only). The demo run is a base model
# that continues text, so `make chat` first teaches it to answer in turns: a short SFT on the embedded instruction
# data (about 4 minutes of CPU time) into runs/chat, done once (delete runs/chat to redo it).
CHAT_SFT := --max-steps 100 --warmup-steps 10 --eval-examples 50 --samples 3

chat: setup runs/chat/model/config.json
	$(VENV)/bin/tiny-hf chat --model runs/chat

runs/chat/model/config.json: | setup runs/demo/model/config.json
	$(VENV)/bin/tiny-hf sft --model runs/demo --out runs/chat $(CHAT_SFT)

runs/demo/model/config.json:
	@echo "runs/demo is missing: \`make demo\` pretrains it (about 15 minutes on 2 cores)" >&2; exit 1

serve: setup
	$(VENV)/bin/tiny-hf serve --model runs/demo

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15

test-fast: setup
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow"

# ruff, then the import layers (pyproject's [tool.importlinter] contracts): an upward import fails with its line.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	for name in tokenizer model-speed train-speed serve-speed attention-cost rag; do \
		$(VENV)/bin/tiny-hf bench $$name || exit 1; done

# report/REPORT.md: every stage's figures and plots in one page, from run folders and bench/results; a stage with no
# run folder is run at a small budget (<= 30 minutes in all). QUICK=1: a tiny model for a few steps (<= 5 minutes).
report: setup
	$(VENV)/bin/tiny-hf report $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) runs data .pytest_cache .ruff_cache
